"""`imagpose`: the command line.

  imagpose generate --weights weights/ --source person.png --source-pose person_pose.json \\
      --target-pose t1.json [--target-pose t2.png ...] [--view-size 512x512] [--dtype bfloat16] --out results/
  imagpose generate --weights weights/ --source me.jpg --target-photo friend.jpg --dwpose ckpts/ --out results/
                                           (poses taken from the photos: --dwpose DIR, or MediaPipe by default)
  imagpose demo --out outputs/demo         (main job: synthetic data, VAE + denoiser training, 3 scenarios scored)
  imagpose train --config configs/stage1.py --workdir runs/stage1   (one training stage; see launch/ for pods)
  imagpose make-dataset data/ ...          (the synthetic pose-transfer dataset)
  imagpose test --weights weights/ --pairs pairs.csv --annotations annotations.csv --images test/ --out gen/
                                           (every pair of a test set, resumable; or --index test.json)
  imagpose evaluate --generated gen/ --targets test/ --out eval/   (SSIM, LPIPS, FID, PSNR, L1 of a generated test set)
  imagpose pose me.jpg --out poses/ --dwpose ckpts/   (18-keypoint OpenPose JSON + rendering from photos, DWPose;
                                                       --backend mediapipe: MediaPipe in its own environment)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _view_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"view size must look like 512x512 (HEIGHTxWIDTH), got {text!r}") from None
    return h, w


def _sampler_config(args):
    """The `SamplerConfig` of `_sampling_arguments`' options."""
    from imagpose_jax.sampling.sampler import SamplerConfig
    make = SamplerConfig.original_inference if args.original_inference else SamplerConfig
    return make(num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler)


def generate(args) -> int:
    from imagpose_jax.images import save_image
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline

    if not args.source:
        raise SystemExit("error: give at least one --source image")
    if len(args.source) > 3:
        raise SystemExit(f"error: at most 3 --source images, got {len(args.source)}")
    if args.source_pose and len(args.source_pose) != len(args.source):
        raise SystemExit(f"error: {len(args.source)} --source image(s) but {len(args.source_pose)} --source-pose: one "
                         f"each (or none: then the poses are taken from the source photos)")
    if not args.targets:
        raise SystemExit("error: give at least one --target-pose or --target-photo")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, got {args.batch_size}")
    _writable_folder(args.out)   # before the weights are loaded and minutes of sampling
    source_poses, target_poses = _poses_from_photos(args)
    pipe = IMAGPosePipeline.from_pretrained(args.weights, _sampler_config(args), dtype=args.dtype)
    result = pipe(args.source, source_poses, target_poses, view_size=args.view_size, seed=args.seed,
                  batch_size=args.batch_size)
    for j, image in enumerate(result.targets):
        save_image(os.path.join(args.out, f"target_{j:03d}.png"), image)
    save_image(os.path.join(args.out, "sheet.png"), result.sheet())
    print(f"{len(result.targets)} target(s) from {len(result.grids)} grid(s) -> {args.out}/target_*.png, sheet.png")
    return 0


def _poses_from_photos(args) -> tuple[list[str], list[str]]:
    """generate's source and target poses: the ones given, and those of the photos given instead (the sources
    without --source-pose, the --target-photo photos), extracted into OUT/poses/ (`pose_extract.photo_poses`)."""
    photos = list(dict.fromkeys(([] if args.source_pose else args.source) +
                                [v for kind, v in args.targets if kind == "photo"]))
    pose_of = {}
    if photos:
        from imagpose_jax.pose_extract import backend_from_args, photo_poses
        backend = backend_from_args(args)
        try:
            pose_of = dict(zip(photos, photo_poses(photos, backend, os.path.join(args.out, "poses"))))
        except RuntimeError as err:   # a backend that stopped (the MediaPipe worker)
            raise SystemExit(f"error: {err}") from None
        finally:
            getattr(backend, "close", lambda: None)()
        print(f"poses of {len(photos)} photo(s) -> {os.path.join(args.out, 'poses')}/")
    return (args.source_pose or [pose_of[s] for s in args.source],
            [v if kind == "pose" else pose_of[v] for kind, v in args.targets])


def test(args) -> int:
    """`imagpose test`: a whole test set (`sampling.test_set`)."""
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline
    from imagpose_jax.sampling.test_set import generate_test_set, read_test_pairs

    if (args.index is None) == (args.annotations is None):
        raise SystemExit("error: give --annotations CSV --images DIR --pairs CSV (DeepFashion) or --index JSON")
    if args.annotations is not None and (args.images is None or args.pairs is None):
        raise SystemExit("error: --annotations needs --images DIR (the images it names) and --pairs CSV")
    pairs = read_test_pairs(pairs_csv=args.pairs, annotations_csv=args.annotations, image_dir=args.images,
                            index_json=args.index, naming=args.naming)
    _writable_folder(args.out)
    pipe = IMAGPosePipeline.from_pretrained(args.weights, _sampler_config(args), dtype=args.dtype)
    done = generate_test_set(pipe, pairs, args.out, view_size=args.view_size, size=args.size, seed=args.seed,
                             batch_size=args.batch_size)
    print(f"{done['generated']} pair(s) generated, {done['skipped']} already there -> {args.out} "
          f"({done['pairs']} pairs, {args.size[0]}x{args.size[1]})")
    return 0


def _writable_folder(path: str) -> None:
    """Creates `path` (and parents) and checks that a file can be written there; an error names the folder."""
    import tempfile
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SystemExit(f"error: cannot write to the output folder {path!r}: {err.strerror or err}") from None


def _sampling_arguments(p: argparse.ArgumentParser, *, batch_size: int | None, batch_help: str) -> None:
    """The sampling options `generate` and `test` share (`_sampler_config` reads them)."""
    from imagpose_jax.models.layers import DTYPES
    from imagpose_jax.schedulers import SCHEDULERS
    p.add_argument("--view-size", type=_view_size, default=(512, 512), help="HEIGHTxWIDTH of each view, multiples of 64")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="ddim",
                   help="ddim (30 steps, as the original) or dpmsolver++ (multistep DPM-Solver++: ~15-20 steps suffice)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="weights and compute (bfloat16: half the memory; GroupNorm statistics, softmax and the "
                        "scheduler stay float32; see the README's 'Half precision')")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--original-inference", action="store_true",
                   help="reproduce the original's inference exactly (spec section 8), e.g. for its checkpoints")


def build_parser() -> argparse.ArgumentParser:
    from imagpose_jax.sampling.test_set import NAMINGS, PROTOCOL_SIZE

    p = argparse.ArgumentParser(prog="imagpose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a person in target poses from 1-3 source images")
    g.add_argument("--weights", required=True, help="converted folder (imagpose-convert pipeline): denoiser/ vae/ image_encoder/")
    g.add_argument("--source", action="append", default=[], help="source image (1-3; repeat the flag)")
    g.add_argument("--source-pose", action="append", default=[],
                   help="each source's pose: a rendered pose image or an 18-keypoint OpenPose JSON (none: taken from "
                        "the source photos with the pose backend below)")
    g.add_argument("--target-pose", action="append", dest="targets", default=[], type=lambda v: ("pose", v),
                   help="target pose(s): image or OpenPose JSON (any number, in order with --target-photo)")
    g.add_argument("--target-photo", action="append", dest="targets", type=lambda v: ("photo", v),
                   help="a photo of someone in the target pose: its pose is extracted (into OUT/poses/) and used")
    from imagpose_jax.pose_extract import add_backend_arguments
    add_backend_arguments(g, prefix="pose-")
    _sampling_arguments(g, batch_size=4, batch_help="grids per compiled batch")
    g.add_argument("--out", required=True)
    g.set_defaults(fn=generate)
    t = sub.add_parser("test", help="generate every pair of a test set (DeepFashion pairs CSV, or the original's JSON "
                                    "index), resumable, named and sized for the peers' evaluation scripts")
    t.add_argument("--weights", required=True, help="converted folder (imagpose-convert pipeline): denoiser/ vae/ image_encoder/")
    t.add_argument("--pairs", help="DeepFashion pairs CSV (header from,to), e.g. fasion-resize-pairs-test.csv")
    t.add_argument("--annotations", help="DeepFashion annotation CSV (name:keypoints_y:keypoints_x) of the images")
    t.add_argument("--images", help="the folder of the images the annotation CSV names")
    t.add_argument("--index", help="the original's JSON index (instead of --annotations/--images; --pairs optional: "
                                   "without it, each person's first view to each other view)")
    t.add_argument("--size", type=_view_size, default=PROTOCOL_SIZE,
                   help="HEIGHTxWIDTH of the written images: 256x176 (the protocol's) or 512x352")
    t.add_argument("--naming", choices=tuple(NAMINGS), default="pidm",
                   help="pidm: FROM_2_TO_vis.png (PIDM/GFLA metric scripts); pcdms: FROM_to_TO.png")
    _sampling_arguments(t, batch_size=None, batch_help="grids per compiled batch (default 4 per local device)")
    t.add_argument("--out", required=True, help="folder of the generated images (a rerun skips those there)")
    t.set_defaults(fn=test)
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv=None) -> int:
    """Expected failures (bad input, a missing or mismatched file) print one line naming it and exit 2; `--debug`
    (anywhere in the arguments) or IMAGPOSE_DEBUG=1 shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("IMAGPOSE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        return _dispatch(argv)
    try:
        return _dispatch(argv)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as err:
        name = "imagpose " + (argv[0] if argv else "")
        print(f"{name.strip()}: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2


# Subcommands with parsers of their own (absl / config_flags or their own argparse): name -> (entry, help).
SUBCOMMANDS = {
    "demo": ("imagpose_jax.demo:main",
             "main job: synthetic data -> training -> the 3 scenarios, scored (see imagpose demo --help)"),
    "train": ("imagpose_jax.train.main:main", "train one stage from a config file (see imagpose train --help)"),
    "make-dataset": ("imagpose_jax.data.synthetic:main",
                     "write the synthetic pose-transfer dataset (see imagpose make-dataset --help)"),
    "aot": ("imagpose_jax.train.aot:main",
            "compile a training stage for a TPU topology on this machine (see imagpose aot --help)"),
    "evaluate": ("imagpose_jax.metrics.folders:main",
                 "score a folder of generated images against their targets (see imagpose evaluate --help)"),
    "pose": ("imagpose_jax.pose_extract:main",
             "OpenPose JSON and pose images from photos, with DWPose or MediaPipe (see imagpose pose --help)"),
}


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        module, fn = SUBCOMMANDS[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), fn)(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
