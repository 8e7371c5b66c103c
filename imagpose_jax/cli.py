"""`imagpose`: the command line.

  imagpose generate --weights weights/ --source person.png --source-pose person_pose.json \\
      --target-pose t1.json [--target-pose t2.png ...] [--view-size 512x512] [--dtype bfloat16] --out results/
  imagpose demo --out outputs/demo         (main job: synthetic data, VAE + denoiser training, 3 scenarios scored)
  imagpose train --config configs/stage1.py --workdir runs/stage1   (one training stage; see launch/ for pods)
  imagpose make-dataset data/ ...          (the synthetic pose-transfer dataset)
  imagpose evaluate --generated gen/ --targets test/ --out eval/   (SSIM, LPIPS, FID, PSNR, L1 of a generated test set)
  imagpose pose me.jpg --out poses/ --dwpose ckpts/   (18-keypoint OpenPose JSON + rendering from photos, DWPose)
"""
from __future__ import annotations

import argparse
import os
import sys


def _view_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"view size must look like 512x512 (HEIGHTxWIDTH), got {text!r}") from None
    return h, w


def generate(args) -> int:
    from imagpose_jax.images import save_image
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline
    from imagpose_jax.sampling.sampler import SamplerConfig

    if not args.source:
        raise SystemExit("error: give at least one --source image")
    if len(args.source) > 3:
        raise SystemExit(f"error: at most 3 --source images, got {len(args.source)}")
    if len(args.source_pose) != len(args.source):
        raise SystemExit(f"error: {len(args.source)} --source image(s) but {len(args.source_pose)} --source-pose: one each")
    if not args.target_pose:
        raise SystemExit("error: give at least one --target-pose")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be at least 1, got {args.batch_size}")
    make = SamplerConfig.original_inference if args.original_inference else SamplerConfig
    cfg = make(num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler)
    _writable_folder(args.out)   # before the weights are loaded and minutes of sampling
    pipe = IMAGPosePipeline.from_pretrained(args.weights, cfg, dtype=args.dtype)
    result = pipe(args.source, args.source_pose, args.target_pose, view_size=args.view_size, seed=args.seed,
                  batch_size=args.batch_size)
    for j, image in enumerate(result.targets):
        save_image(os.path.join(args.out, f"target_{j:03d}.png"), image)
    save_image(os.path.join(args.out, "sheet.png"), result.sheet())
    print(f"{len(result.targets)} target(s) from {len(result.grids)} grid(s) -> {args.out}/target_*.png, sheet.png")
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


def build_parser() -> argparse.ArgumentParser:
    from imagpose_jax.models.layers import DTYPES
    from imagpose_jax.schedulers import SCHEDULERS

    p = argparse.ArgumentParser(prog="imagpose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a person in target poses from 1-3 source images")
    g.add_argument("--weights", required=True, help="converted folder (imagpose-convert pipeline): denoiser/ vae/ image_encoder/")
    g.add_argument("--source", action="append", default=[], help="source image (1-3; repeat the flag)")
    g.add_argument("--source-pose", action="append", default=[],
                   help="each source's pose: a rendered pose image or an 18-keypoint OpenPose JSON")
    g.add_argument("--target-pose", action="append", default=[], help="target pose(s): image or OpenPose JSON (any number)")
    g.add_argument("--view-size", type=_view_size, default=(512, 512), help="HEIGHTxWIDTH of each view, multiples of 64")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=2.0)
    g.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="ddim",
                   help="ddim (30 steps, as the original) or dpmsolver++ (multistep DPM-Solver++: ~15-20 steps suffice)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="weights and compute (bfloat16: half the memory; GroupNorm statistics, softmax and the "
                        "scheduler stay float32; see the README's 'Half precision')")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--batch-size", type=int, default=4, help="grids per compiled batch")
    g.add_argument("--original-inference", action="store_true",
                   help="reproduce the original's inference exactly (spec section 8), e.g. for its checkpoints")
    g.add_argument("--out", required=True)
    g.set_defaults(fn=generate)
    for name, text in (("demo", "main job: synthetic data -> training -> the 3 scenarios, scored (see imagpose demo --help)"),
                       ("train", "train one stage from a config file (see imagpose train --help)"),
                       ("make-dataset", "write the synthetic pose-transfer dataset (see imagpose make-dataset --help)"),
                       ("aot", "compile a training stage for a TPU topology on this machine (see imagpose aot --help)"),
                       ("evaluate", "score a folder of generated images against their targets (see imagpose evaluate --help)"),
                       ("pose", "OpenPose JSON and pose images from photos, with DWPose (see imagpose pose --help)")):
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


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:
        from imagpose_jax.demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] == ["train"]:
        from imagpose_jax.train.main import main as train_main
        return train_main(argv[1:])
    if argv[:1] == ["make-dataset"]:
        from imagpose_jax.data.synthetic import main as dataset_main
        return dataset_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from imagpose_jax.metrics.folders import main as evaluate_main
        return evaluate_main(argv[1:])
    if argv[:1] == ["aot"]:
        from imagpose_jax.train.aot import main as aot_main
        return aot_main(argv[1:])
    if argv[:1] == ["pose"]:
        from imagpose_jax.pose_extract import main as pose_main
        return pose_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
