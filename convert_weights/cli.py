"""`imagpose-convert`: PyTorch checkpoints -> a parameter folder (config.json + params.safetensors), and back.

  imagpose-convert imagpose --unet denoising_unet-N.pth --pose-guider pose_guider-N.pth --patch patch-N.pth \
      [--config case_or_config.json] --out ckpt/
  imagpose-convert sd15 --unet-dir sd15/unet [--motion-module mm_sd_v15_v2.ckpt] --out ckpt/
  imagpose-convert sd15 --single-file v1-5-pruned-emaonly.safetensors [--unet-config unet/] [--no-ema] --out ckpt/
  imagpose-convert pipeline --unet ... --pose-guider ... --patch ... --vae sd-vae-ft-mse/ \
      --image-encoder dinov2-base/ [--config config.json] --out weights/
  imagpose-convert vae --vae vae-ft-mse-840000-ema-pruned.safetensors [--vae-config vae/] --out weights/vae/
  imagpose-convert add-cva --params runs/stage1/export/denoiser --motion-module mm_sd_v15_v2.ckpt --out stage2_init/
  imagpose-convert export --params ckpt/ --out torch_ckpt/ [--step N]

`--config` is a JSON with `unet_config` / `pose_guider_config` / `patch_config` (the original's settings, as in
a golden case.json); without it the full-size IMAGPose (SD1.5 + CVA) is assumed. A `--vae` is a diffusers folder
or a single file (a whole SD checkpoint, or a standalone VAE file); `--unet-config` / `--vae-config` give a single
file's diffusers config (config.json or its folder), by default SD1.5's.

Every `--out` folder is written whole: into `<out>.tmp-<pid>` beside it, renamed to `<out>` when complete (a
conversion killed half-way leaves the old folder, or none). An existing non-empty `--out` is refused unless
`--overwrite` is given; then it is replaced whole (no file of the old folder survives). An input that cannot be read
or does not match (a missing or damaged file, a key or shape mismatch, a NaN or inf tensor) is one error naming it,
no traceback (IMAGPOSE_DEBUG=1 shows it); no --out is written then.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from flax import nnx


def _config(path):
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    if path is None:
        return IMAGPoseConfig()
    with open(path) as f:
        return IMAGPoseConfig.from_case(json.load(f))


def convert_imagpose(args) -> None:
    from convert_weights.imagpose import load_imagpose
    from imagpose_jax.checkpoint import save_params
    cfg = _config(args.config)
    params = load_imagpose(cfg, args.unet, args.pose_guider, args.patch)
    save_params(args.out, cfg.to_dict(), params)


def convert_sd15(args) -> None:
    """SD1.5 UNet (+ motion module for CVA) -> IMAGPose params; pose guider and patch embedding freshly initialised
    (the pose guider's last conv is zero, so the model starts as SD)."""
    from convert_weights.core import load_torch_file
    from convert_weights.imagpose import read_diffusers_unet, read_single_file_unet, unet_from_sd15
    from imagpose_jax.checkpoint import save_params
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    from imagpose_jax.models.unet_config import UNetConfig

    if args.single_file:
        sd_cfg, sd, origins = read_single_file_unet(args.single_file, args.unet_config, ema=not args.no_ema)
    elif args.unet_config or args.no_ema:
        raise SystemExit("error: --unet-config and --no-ema are for --single-file (a --unet-dir has its own config.json)")
    else:
        (sd_cfg, sd), origins = read_diffusers_unet(args.unet_dir), None
    unet_cfg = UNetConfig.from_dict({**sd_cfg, "in_channels": 9}).replace(use_cva=args.motion_module is not None)
    cfg = IMAGPoseConfig(unet=unet_cfg)
    mm = load_torch_file(args.motion_module) if args.motion_module else None
    unet = unet_from_sd15(unet_cfg, sd, mm, source=args.single_file or args.unet_dir, origins=origins)
    save_params(args.out, cfg.to_dict(), nnx.State({"unet": unet, **_init_heads(cfg, args.seed)}))


def add_cva(args) -> None:
    """A stage-1 parameter folder (no CVA) + a motion-module checkpoint -> the stage-2 initialisation: the same
    UNet, pose guider and patch embedding, with CVA modules from the motion module (strictly converted)."""
    from convert_weights.core import load_torch_file, nnx_to_torch
    from convert_weights.imagpose import UNET_RENAMES, unet_from_sd15
    from imagpose_jax.checkpoint import save_params
    from imagpose_jax.checkpoint.params import load_params, read_config
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.init import abstract

    cfg = IMAGPoseConfig.from_case(read_config(args.params))
    if cfg.unet.use_cva:
        raise SystemExit(f"error: {args.params} already has CVA modules (use_cva=true): expected a stage-1 folder")
    params = load_params(args.params, nnx.state(abstract(lambda k: IMAGPose(cfg, rngs=k)), nnx.Param))
    cva_cfg = cfg.replace(unet=cfg.unet.replace(use_cva=True))
    unet_sd = nnx_to_torch(params["unet"], renames=UNET_RENAMES)
    unet = unet_from_sd15(cva_cfg.unet, unet_sd, load_torch_file(args.motion_module), source=args.motion_module)
    save_params(args.out, cva_cfg.to_dict(),
                nnx.State({"unet": unet, "pose_guider": params["pose_guider"], "patch": params["patch"]}))


def _init_heads(cfg, seed: int) -> dict:
    """Random pose guider and patch embedding (no full UNet is built)."""
    from imagpose_jax.models.patch import PatchEmbed
    from imagpose_jax.models.pose_guider import PoseGuider
    rngs = nnx.Rngs(seed)
    pg = PoseGuider(cfg.unet.block_out_channels[0], 3, cfg.pose_guider_channels, rngs=rngs)
    patch = PatchEmbed(cfg.patch_size, cfg.latent_channels, cfg.embed_dim, rngs=rngs)
    return {"pose_guider": nnx.state(pg, nnx.Param), "patch": nnx.state(patch, nnx.Param)}


def convert_pipeline(args) -> None:
    """Everything inference needs, into one folder: denoiser/, vae/, image_encoder/ (each config.json +
    params.safetensors). Loading it needs no PyTorch."""
    from convert_weights.dinov2 import load_dinov2
    from imagpose_jax.checkpoint import save_params
    from imagpose_jax.checkpoint.folder import PipelineFolder
    out = PipelineFolder(args.out)
    convert_imagpose(argparse.Namespace(**{**vars(args), "out": out.denoiser}))
    convert_vae(argparse.Namespace(**{**vars(args), "out": out.vae}))
    _, model = load_dinov2(args.image_encoder)
    with open(os.path.join(args.image_encoder, "config.json")) as f:
        config = json.load(f)
    save_params(out.image_encoder, config, nnx.state(model, nnx.Param))


def convert_vae(args) -> None:
    """A VAE (diffusers folder or single file) -> a parameter folder (`config.init.vae`, an inference folder's vae/)."""
    from convert_weights.vae import load_vae, vae_config
    from imagpose_jax.checkpoint import save_params
    config = vae_config(args.vae, args.vae_config)
    _, model = load_vae(args.vae, config=None if os.path.isdir(args.vae) else config)
    save_params(args.out, config, nnx.state(model, nnx.Param))


def export(args) -> list[str]:
    from convert_weights.imagpose import export_imagpose
    from imagpose_jax.checkpoint.params import load_params, read_config
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.init import abstract
    cfg = IMAGPoseConfig.from_case(read_config(args.params))
    abstract = nnx.state(abstract(lambda k: IMAGPose(cfg, rngs=k)), nnx.Param)
    paths = export_imagpose(load_params(args.params, abstract), cfg, args.out, args.step)
    with open(f"{args.out}/config.json", "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    return [os.path.basename(p) for p in paths.values()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagpose-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("imagpose", help="the original IMAGPose .pth files -> parameter folder")
    a.add_argument("--unet", required=True, help="denoising_unet-N.pth (or motion_module-N.pth: whole-UNet state dict)")
    a.add_argument("--pose-guider", required=True)
    a.add_argument("--patch", required=True)
    a.add_argument("--config", help="JSON with unet_config/pose_guider_config/patch_config (default: full-size IMAGPose)")
    a.add_argument("--out", required=True)
    a.set_defaults(fn=convert_imagpose)
    b = sub.add_parser("sd15", help="SD1.5 UNet (diffusers folder or single file) (+ motion module) -> parameter "
                       "folder (training init)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--unet-dir", help="diffusers unet/ folder: config.json + diffusion_pytorch_model.*")
    src.add_argument("--single-file", help="a single-file SD checkpoint in the original LDM layout (.safetensors/.ckpt, "
                     "e.g. v1-5-pruned-emaonly.safetensors): its model.diffusion_model.* (or model_ema.*) weights")
    b.add_argument("--unet-config", help="with --single-file: the UNet's diffusers config.json (or its folder); "
                   "default SD1.5's")
    b.add_argument("--no-ema", action="store_true", help="with --single-file: the non-EMA weights even when the file "
                   "has EMA ones (model_ema.*)")
    b.add_argument("--motion-module", help="AnimateDiff-style motion module (.ckpt/.pth/.safetensors): gives a CVA model")
    b.add_argument("--seed", type=int, default=0, help="seed for the freshly initialised pose guider and patch embedding")
    b.add_argument("--out", required=True)
    b.set_defaults(fn=convert_sd15)
    e = sub.add_parser("add-cva", help="stage-1 parameter folder + motion module -> stage-2 initialisation (CVA added)")
    e.add_argument("--params", required=True, help="a stage-1 parameter folder (e.g. runs/stage1/export/denoiser)")
    e.add_argument("--motion-module", required=True, help="AnimateDiff-style motion module (.ckpt/.pth/.safetensors)")
    e.add_argument("--out", required=True)
    e.set_defaults(fn=add_cva)
    d = sub.add_parser("pipeline", help="IMAGPose .pth files + diffusers VAE + transformers DINOv2 -> an inference folder")
    d.add_argument("--unet", required=True)
    d.add_argument("--pose-guider", required=True)
    d.add_argument("--patch", required=True)
    d.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse), or a single file: "
                   "a whole SD checkpoint (first_stage_model.*) or a standalone VAE (vae-ft-mse-840000-ema-pruned.safetensors)")
    d.add_argument("--vae-config", help="with a single-file --vae: its diffusers config.json (or folder); default SD1.5's")
    d.add_argument("--image-encoder", required=True, help="transformers Dinov2Model folder (dinov2-base)")
    d.add_argument("--config", help="JSON with unet_config/pose_guider_config/patch_config (default: full-size IMAGPose)")
    d.add_argument("--out", required=True)
    d.set_defaults(fn=convert_pipeline)
    v = sub.add_parser("vae", help="a VAE (diffusers folder or single file) -> parameter folder (config.init.vae)")
    v.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, a whole SD checkpoint "
                   "(first_stage_model.*) or a standalone VAE file (.safetensors/.ckpt)")
    v.add_argument("--vae-config", help="with a single file: its diffusers config.json (or folder); default SD1.5's")
    v.add_argument("--out", required=True)
    v.set_defaults(fn=convert_vae)
    c = sub.add_parser("export", help="parameter folder -> the original's .pth files")
    c.add_argument("--params", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--step", type=int, default=0, help="N in denoising_unet-N.pth")
    c.set_defaults(fn=export)
    for sp in (a, b, e, d, v, c):
        sp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder (whole)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("convert_weights")  # the converters' info lines (e.g. which weights a file gave)
    if not log.handlers:
        log.setLevel(logging.INFO)
        log.addHandler(logging.StreamHandler())
    from imagpose_jax.checkpoint.folder import atomic_folder
    t0 = time.perf_counter()
    try:
        with atomic_folder(args.out, overwrite=args.overwrite) as tmp:  # written beside --out, swapped in when done
            written = args.fn(argparse.Namespace(**{**vars(args), "out": tmp}))
    except (FileExistsError, FileNotFoundError, ValueError) as err:  # ConversionError, NonFiniteParamsError: named
        if os.environ.get("IMAGPOSE_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"error: {err} (IMAGPOSE_DEBUG=1 shows the traceback)") from None
    for name in written or ():
        print(os.path.join(args.out, name))
    print(f"{args.cmd}: done in {time.perf_counter() - t0:.1f}s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
