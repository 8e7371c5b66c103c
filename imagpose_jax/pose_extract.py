"""`imagpose pose`: 18-keypoint OpenPose poses from photos, as the original IMAGPose extracts them (DWPose).

  imagpose pose me.jpg friend.png --out poses/ --dwpose ckpts/

For each photo it writes ``poses/<name>_pose.json``, OpenPose's format with the photo's pixel coordinates
(``{"version": 1.3, "people": [{"pose_keypoints_2d": [x0, y0, c0, ..., x17, y17, c17]}], "canvas_width": W,
"canvas_height": H}``, missing points 0, 0, 0), and ``poses/<name>_pose.png``, its OpenPose-style rendering at the
photo's size. Either is what ``imagpose generate`` takes as ``--source-pose`` / ``--target-pose``. A photo in which
no person is detected gets an empty ``people`` list and no image.

``--dwpose DIR`` holds the two ONNX files the original uses, ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx``
(its ``weights/ckpts``); see ``imagpose_jax.data.dwpose`` for the pipeline. From Python, ``extract_poses``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imagpose_jax.data.pose import NUM_KEYPOINTS, render_pose
from imagpose_jax.preprocess import as_rgb_image, load_image

OPENPOSE_VERSION = 1.3
BACKENDS = ("dwpose",)


def _backend(backend):
    """A backend object (callable: RGB uint8 array -> (18, 3) keypoints or None), or the folder of DWPose's files."""
    if callable(backend):
        return backend
    if isinstance(backend, (str, os.PathLike)):
        from imagpose_jax.data.dwpose import DWPose

        return DWPose(backend)
    raise TypeError(f"backend must be a pose backend (e.g. imagpose_jax.data.dwpose.DWPose) or the folder of the "
                    f"DWPose ONNX files, got {type(backend).__name__}")


def _rgb_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    return np.asarray(as_rgb_image(image))


def extract_poses(images: Sequence, backend) -> list[np.ndarray | None]:
    """The pose of each image, as the original IMAGPose extracts it.

    Args:
      images: image files, PIL images or uint8 (H, W, 3) RGB arrays.
      backend: a backend such as ``imagpose_jax.data.dwpose.DWPose(folder)`` (anything mapping a uint8 RGB array
        to (18, 3) keypoints or None), or the folder of the DWPose ONNX files.
    Returns:
      per image, (18, 3) float32 ``(x, y, confidence)`` in the image's pixels in ``KEYPOINT_NAMES`` order, missing
      points as (-1, -1, 0) (so ``[:, :2]`` is what ``render_pose`` takes); None where no person is detected.
    """
    backend = _backend(backend)
    out = []
    for image in images:
        kp = backend(_rgb_array(image))
        if kp is not None:
            kp = np.asarray(kp, np.float32)
            if kp.shape != (NUM_KEYPOINTS, 3):
                raise ValueError(f"pose backend returned keypoints of shape {kp.shape}, expected (18, 3)")
        out.append(kp)
    return out


def openpose_json(keypoints: np.ndarray | None, width: int, height: int) -> dict:
    """OpenPose's JSON for one pose (or none): missing points (confidence <= 0, or negative) as 0, 0, 0."""
    people = []
    if keypoints is not None:
        kp = np.asarray(keypoints, np.float32)
        flat = []
        for x, y, c in kp.tolist():
            flat.extend((x, y, c) if c > 0 and x >= 0 and y >= 0 else (0.0, 0.0, 0.0))
        people.append({"pose_keypoints_2d": flat})
    return {"version": OPENPOSE_VERSION, "people": people, "canvas_width": int(width), "canvas_height": int(height)}


def write_pose(keypoints: np.ndarray | None, width: int, height: int, out_dir: str | os.PathLike,
               name: str) -> tuple[str, str | None]:
    """Writes ``<name>_pose.json`` and, for a pose, its rendering ``<name>_pose.png`` at width x height."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}_pose.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(openpose_json(keypoints, width, height), f)
    if keypoints is None:
        return json_path, None
    png_path = os.path.join(out_dir, f"{name}_pose.png")
    kp = np.asarray(keypoints, np.float64)
    xy = np.where((kp[:, 2:] > 0) & (kp[:, :2] >= 0), kp[:, :2], -1.0)
    Image.fromarray(render_pose(xy, height, width)).save(png_path)
    return json_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `imagpose pose PHOTO... --out DIR --dwpose DIR`."""
    p = argparse.ArgumentParser(prog="imagpose pose", description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="photo(s) of a person")
    p.add_argument("--out", required=True, help="folder for <name>_pose.json and <name>_pose.png")
    p.add_argument("--backend", choices=BACKENDS, default="dwpose", help="pose estimator (dwpose: the original's)")
    p.add_argument("--dwpose", metavar="DIR",
                   help="folder holding yolox_l.onnx and dw-ll_ucoco_384.onnx (the original IMAGPose's weights/ckpts)")
    p.add_argument("--threshold", type=float, default=0.3, help="a keypoint scoring at most this is missing")
    p.add_argument("--full-image-fallback", action="store_true",
                   help="with no person detected, estimate the pose on the whole photo (as the original does)")
    p.add_argument("--cpu", action="store_true", help="run onnxruntime on the CPU even where CUDA is available")
    args = p.parse_args(argv)
    if args.backend == "dwpose" and not args.dwpose:
        p.error("the dwpose backend needs --dwpose DIR (the folder of yolox_l.onnx and dw-ll_ucoco_384.onnx)")

    names = [os.path.splitext(os.path.basename(path))[0] for path in args.photos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"error: photos with the same name would write the same files: {', '.join(dupes)}")
    from imagpose_jax.data.dwpose import DWPose

    try:
        backend = DWPose(args.dwpose, keypoint_threshold=args.threshold, full_image_fallback=args.full_image_fallback,
                         providers=["CPUExecutionProvider"] if args.cpu else None)
        images = [load_image(path) for path in args.photos]
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path, name, image in zip(args.photos, names, images):
        (kp,) = extract_poses([image], backend)
        json_path, png_path = write_pose(kp, image.width, image.height, args.out, name)
        if kp is None:
            print(f"{path}: no person detected -> {json_path} (empty people list, no pose image)", file=sys.stderr)
        else:
            n = int((kp[:, 2] > 0).sum())
            print(f"{path}: {n}/{NUM_KEYPOINTS} keypoints -> {json_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
