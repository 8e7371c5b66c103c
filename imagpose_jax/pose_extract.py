"""`imagpose pose`: 18-keypoint OpenPose poses from photos, with DWPose (the original IMAGPose's) or MediaPipe.

  imagpose pose me.jpg friend.png --out poses/ --dwpose ckpts/
  imagpose pose me.jpg friend.png --out poses/ --backend mediapipe     (an isolated environment, see below)

For each photo it writes ``poses/<name>_pose.json``, OpenPose's format with the photo's pixel coordinates
(``{"version": 1.3, "people": [{"pose_keypoints_2d": [x0, y0, c0, ..., x17, y17, c17]}], "canvas_width": W,
"canvas_height": H}``, missing points 0, 0, 0), and ``poses/<name>_pose.png``, its OpenPose-style rendering at the
photo's size. Either is what ``imagpose generate`` takes as ``--source-pose`` / ``--target-pose`` (and ``generate``
runs this itself on ``--source`` photos without ``--source-pose`` and on ``--target-photo`` photos). A photo in which
no person is detected gets an empty ``people`` list and no image.

Backends (``--backend``; default dwpose with ``--dwpose DIR``, else mediapipe):
  - dwpose: ``--dwpose DIR`` holds the two ONNX files the original uses, ``yolox_l.onnx`` and
    ``dw-ll_ucoco_384.onnx`` (its ``weights/ckpts``); see ``imagpose_jax.data.dwpose``.
  - mediapipe: MediaPipe 0.10.21's legacy pose landmarker, whose models ship in its wheel, in a virtual environment
    of its own (``--mediapipe-venv DIR`` or ``$IMAGPOSE_MEDIAPIPE_VENV``; ``--create-mediapipe-venv`` makes one); see
    ``imagpose_jax.data.mediapipe_pose``.
From Python, ``extract_poses`` (and ``write_poses``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imagpose_jax.data.mediapipe_pose import MEDIAPIPE_VERSION, VENV_ENV
from imagpose_jax.data.pose import NUM_KEYPOINTS, render_pose
from imagpose_jax.preprocess import as_rgb_image, load_image

OPENPOSE_VERSION = 1.3
BACKENDS = ("dwpose", "mediapipe")


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


def write_poses(photos: Sequence[str | os.PathLike], backend, out_dir: str | os.PathLike) -> list[dict]:
    """Extracts each photo's pose (`extract_poses`) and writes it (`write_pose`, ``<photo name>_pose.json/png``).
    Returns per photo {"photo", "keypoints" ((18, 3) or None), "json", "png" (None without a person)}. Two photos of
    one name (they would write the same files) are a ValueError naming them."""
    photos = [os.fspath(p) for p in photos]
    names = [os.path.splitext(os.path.basename(p))[0] for p in photos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"photos with the same name would write the same pose files: "
                         f"{', '.join(p for p, n in zip(photos, names) if n in dupes)}")
    backend = _backend(backend)
    out = []
    for path, name in zip(photos, names):
        image = load_image(path)
        (kp,) = extract_poses([image], backend)
        json_path, png_path = write_pose(kp, image.width, image.height, out_dir, name)
        out.append({"photo": path, "keypoints": kp, "json": json_path, "png": png_path})
    return out


def photo_poses(photos: Sequence[str | os.PathLike], backend, out_dir: str | os.PathLike) -> list[str]:
    """The OpenPose JSON file of each photo's pose (`write_poses` into ``out_dir``; its canvas is the photo's size,
    so `IMAGPosePipeline` places the keypoints on any view), the poses `imagpose generate` takes from photos. A
    photo with no person detected is a ValueError naming it."""
    written = write_poses(photos, backend, out_dir)
    empty = [r["photo"] for r in written if r["keypoints"] is None]
    if empty:
        raise ValueError(f"no person detected in {', '.join(empty)}: no pose to take from it")
    return [r["json"] for r in written]


def add_backend_arguments(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The pose-backend options `imagpose pose` and `imagpose generate` share (`backend_from_args` reads them);
    `prefix` ("pose-" in generate) goes before the generic names (backend, threshold, cpu)."""
    p.add_argument(f"--{prefix}backend", dest="pose_backend", choices=BACKENDS, default=None,
                   help="pose estimator: dwpose (the original's; needs --dwpose DIR) or mediapipe (its pose landmarker "
                        "in its own environment); default: dwpose when --dwpose is given, else mediapipe")
    p.add_argument("--dwpose", metavar="DIR",
                   help="folder holding yolox_l.onnx and dw-ll_ucoco_384.onnx (the original IMAGPose's weights/ckpts)")
    p.add_argument("--mediapipe-venv", metavar="DIR",
                   help=f"the virtual environment holding mediapipe=={MEDIAPIPE_VERSION} (default: ${VENV_ENV}, else "
                        f"~/.cache/imagpose-jax/mediapipe-{MEDIAPIPE_VERSION})")
    p.add_argument(f"--{prefix}threshold", dest="pose_threshold", type=float, default=None,
                   help="a keypoint scoring at most this is missing (dwpose, default 0.3), or with a visibility below "
                        "it (mediapipe, default 0.5)")
    p.add_argument("--full-image-fallback", action="store_true",
                   help="dwpose: with no person detected, estimate the pose on the whole photo (as the original does)")
    p.add_argument(f"--{prefix}cpu", dest="pose_cpu", action="store_true",
                   help="dwpose: run onnxruntime on the CPU even where CUDA is available")


def backend_from_args(args):
    """The backend `add_backend_arguments`' options name; SystemExit with a one-line error when it cannot start."""
    name = args.pose_backend or ("dwpose" if args.dwpose else "mediapipe")
    try:
        if name == "dwpose":
            from imagpose_jax.data.dwpose import KEYPOINT_THR, DWPose
            if not args.dwpose:
                raise SystemExit("error: the dwpose backend needs --dwpose DIR (the folder of yolox_l.onnx and "
                                 "dw-ll_ucoco_384.onnx)")
            thr = KEYPOINT_THR if args.pose_threshold is None else args.pose_threshold
            return DWPose(args.dwpose, keypoint_threshold=thr, full_image_fallback=args.full_image_fallback,
                          providers=["CPUExecutionProvider"] if args.pose_cpu else None)
        from imagpose_jax.data.mediapipe_pose import VISIBILITY_THR, MediaPipePose
        thr = VISIBILITY_THR if args.pose_threshold is None else args.pose_threshold
        return MediaPipePose(args.mediapipe_venv, visibility_threshold=thr)
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `imagpose pose PHOTO... --out DIR [--dwpose DIR | --backend mediapipe]`."""
    p = argparse.ArgumentParser(prog="imagpose pose", description=__doc__.split("\n\n")[0])
    p.add_argument("photos", nargs="*", metavar="PHOTO", help="photo(s) of a person")
    p.add_argument("--out", help="folder for <name>_pose.json and <name>_pose.png")
    add_backend_arguments(p)
    p.add_argument("--create-mediapipe-venv", action="store_true",
                   help=f"create the mediapipe=={MEDIAPIPE_VERSION} environment (at --mediapipe-venv or the default; "
                        f"needs the network, ~25 s, 400 MB) and, without photos, stop")
    args = p.parse_args(argv)
    if args.create_mediapipe_venv:
        from imagpose_jax.data.mediapipe_pose import create_venv
        try:
            print(f"MediaPipe environment: {create_venv(args.mediapipe_venv)}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            raise SystemExit(f"error: {err}") from None
        if not args.photos:
            return 0
    if not args.photos or not args.out:
        p.error("give the photo(s) and --out DIR")
    backend = backend_from_args(args)
    try:
        for r in write_poses(args.photos, backend, args.out):
            if r["keypoints"] is None:
                print(f"{r['photo']}: no person detected -> {r['json']} (empty people list, no pose image)",
                      file=sys.stderr)
            else:
                n = int((r["keypoints"][:, 2] > 0).sum())
                print(f"{r['photo']}: {n}/{NUM_KEYPOINTS} keypoints -> {r['json']}, {r['png']}")
    except RuntimeError as err:   # a backend that stopped (the MediaPipe worker)
        raise SystemExit(f"error: {err}") from None
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
