"""IMAGPose's denoiser weights: the original's `.pth` files and SD1.5/AnimateDiff checkpoints <-> our params.

Formats read (spec section 9):
- IMAGPose checkpoints: `denoising_unet-N.pth` / `motion_module-N.pth` (whole-UNet state dicts, CVA included),
  `pose_guider-N.pth`, `patch-N.pth`;
- SD1.5's UNet in diffusers layout (`unet/config.json` + `diffusion_pytorch_model.safetensors` or `.bin`), or in
  a single-file SD checkpoint (LDM layout, `convert_weights/single_file.py`);
- AnimateDiff-style motion-module files (`.ckpt`/`.pth`/`.safetensors`, `state_dict` wrapper or `module.` prefix).

Deliberate skips (everything else must match exactly):
- `*.pos_encoder.pe`: the fixed sinusoidal view-position table, which the model computes itself; the file's
  table is checked against ours and a different one is an error.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from convert_weights.core import ConversionError, Skip, load_torch_file, nnx_to_torch, torch_to_nnx
from imagpose_jax.models.cva import sinusoidal_table
from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
from imagpose_jax.models.init import abstract
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig

UNET_RENAMES = (("to_out_0", "to_out.0"), ("net_0", "net.0"), ("net_2", "net.2"))
PE_PATTERN = r"\.pos_encoder\.pe$"


def _check_pe(key: str, pe: np.ndarray) -> None:
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ConversionError(f"{key}: expected a (1, max_len, C) position table, got shape {pe.shape}")
    want = sinusoidal_table(pe.shape[1], pe.shape[2])
    err = float(np.abs(pe.astype(np.float32) - want).max())
    if err > 1e-5:
        raise ConversionError(f"{key}: not the standard sinusoidal position table (max difference {err:.3g}); "
                              f"this model computes that table and cannot load a different one")


PE_SKIP = Skip(PE_PATTERN, "fixed sinusoidal view-position table, computed by the model", _check_pe)


def abstract_model(cfg: IMAGPoseConfig) -> IMAGPose:
    return abstract(lambda k: IMAGPose(cfg, rngs=k))


def _params(module) -> nnx.State:
    return nnx.state(module, nnx.Param)


# ----------------------------------------------------------------------------------------------
# Original IMAGPose checkpoints.

def load_imagpose(cfg: IMAGPoseConfig, unet: str | Mapping, pose_guider: str | Mapping, patch: str | Mapping) -> nnx.State:
    """The original's three state dicts (paths or dicts) -> params of `IMAGPose(cfg)` (an `nnx.State`)."""
    model = abstract_model(cfg)
    parts = {"unet": (unet, (PE_SKIP,)), "pose_guider": (pose_guider, ()), "patch": (patch, ())}
    out = {}
    for name, (src, skip) in parts.items():
        sd, label = _read(src, name)
        out[name] = torch_to_nnx(_params(getattr(model, name)), sd, renames=UNET_RENAMES, skip=skip, source=label)
    return nnx.State(out)


def export_imagpose(params: nnx.State, cfg: IMAGPoseConfig, out_dir: str | os.PathLike, step: int = 0) -> dict[str, str]:
    """Writes `denoising_unet-N.pth`, `pose_guider-N.pth`, `patch-N.pth` in the original's key layout, so a
    model trained here runs in the PyTorch original. Returns the paths written."""
    from convert_weights.core import save_torch_file
    os.makedirs(out_dir, exist_ok=True)
    unet_sd = nnx_to_torch(params["unet"], renames=UNET_RENAMES)
    if cfg.unet.use_cva:
        unet_sd = _with_pe_buffers(unet_sd, cfg.unet)
    paths = {}
    for name, sd, fname in (("unet", unet_sd, "denoising_unet"),
                            ("pose_guider", nnx_to_torch(params["pose_guider"]), "pose_guider"),
                            ("patch", nnx_to_torch(params["patch"]), "patch")):
        paths[name] = os.path.join(out_dir, f"{fname}-{step}.pth")
        save_torch_file(sd, paths[name])
    return paths


def _with_pe_buffers(sd: dict, cfg: UNetConfig) -> dict:
    """Re-inserts the `pos_encoder.pe` buffers the original's state dicts carry, in its key order."""
    if not cfg.cva_kwargs.get("temporal_position_encoding", True):
        return sd
    max_len = cfg.cva_kwargs.get("temporal_position_encoding_max_len", 32)
    out = {}
    for k, v in sd.items():
        out[k] = v
        if ".attention_blocks." in k and k.endswith(".to_out.0.bias"):
            out[k[: -len("to_out.0.bias")] + "pos_encoder.pe"] = _torch_position_table(max_len, v.shape[0])
    return out


def _torch_position_table(max_len: int, dim: int) -> np.ndarray:
    """The sinusoidal table computed with PyTorch's float32 kernels, bit-identical to the buffer the original saves."""
    import math

    import torch
    position = torch.arange(max_len).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div)
    pe[0, :, 1::2] = torch.cos(position * div)
    return pe.numpy()


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 1.5 and motion modules -> an IMAGPose UNet (training stages 1 and 2).

def read_diffusers_unet(folder: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A diffusers `unet/` folder -> (config dict, state dict)."""
    import json
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a diffusers UNet folder (config.json + weights)")
    with open(cfg_path) as f:
        config = json.load(f)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return config, load_torch_file(os.path.join(folder, name))
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {folder}")


def read_single_file_unet(path: str | os.PathLike, config=None, ema: bool = True) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """A single-file SD checkpoint (LDM layout: `v1-5-pruned-emaonly.safetensors`, `v1-5-pruned.ckpt`) -> (config
    dict, diffusers-layout state dict, {diffusers key: file key}). `config`: the UNet's diffusers config (a dict,
    a config.json or its folder), by default SD1.5's; `ema`: the EMA weights when the file has them."""
    from convert_weights.single_file import SD15_UNET_CONFIG, ldm_unet, read_config
    config = read_config(config, SD15_UNET_CONFIG)
    sd, origins = ldm_unet(load_torch_file(path), config, ema=ema, source=os.fspath(path))
    return config, sd, origins


def expand_conv_in(sd: dict[str, np.ndarray], in_channels: int = 9) -> dict[str, np.ndarray]:
    """SD's 4-channel `conv_in` -> `in_channels`: SD's 4 latent channels copied, the new ones zero (spec section 8)."""
    w = sd["conv_in.weight"]
    if w.shape[1] == in_channels:
        return sd
    if w.shape[1] != 4:
        raise ConversionError(f"conv_in.weight has {w.shape[1]} input channels; expected 4 (SD) or {in_channels}")
    new = np.zeros((w.shape[0], in_channels, *w.shape[2:]), w.dtype)
    new[:, :4] = w
    return {**sd, "conv_in.weight": new}


def unet_from_sd15(cfg: UNetConfig, sd15: Mapping[str, np.ndarray], motion_module: Mapping[str, np.ndarray] | None = None,
                   source: str = "SD1.5 UNet", origins: Mapping[str, str] | None = None) -> nnx.State:
    """UNet params from SD1.5 weights (+ a motion-module state dict for the CVA modules when `cfg.use_cva`).
    `origins`: the file's key of each key of `sd15` when it was renamed (`read_single_file_unet`), for errors."""
    sd = expand_conv_in(dict(sd15), cfg.in_channels)
    if cfg.use_cva:
        if motion_module is None:
            raise ConversionError("a CVA model needs a motion-module checkpoint for its CVA modules (or use a stage-1 config)")
        clash = [k for k in motion_module if k in sd]
        if clash:
            raise ConversionError(f"motion-module file overlaps the SD UNet in {len(clash)} keys, e.g. {clash[0]}")
        foreign = [k for k in motion_module if ".motion_modules." not in k]
        if foreign:
            raise ConversionError(f"motion-module file has {len(foreign)} non-motion-module key(s), e.g. {foreign[0]}")
        sd.update(motion_module)
    elif motion_module is not None:
        raise ConversionError("a motion-module checkpoint was given for a model without CVA (use_cva=False)")
    return torch_to_nnx(_params(abstract(lambda k: UNet(cfg, rngs=k))), sd, renames=UNET_RENAMES, skip=(PE_SKIP,), source=source,
                        origins=origins)


def _read(src, name: str) -> tuple[dict, str]:
    if isinstance(src, (str, os.PathLike)):
        return load_torch_file(src), os.fspath(src)
    return dict(src), f"{name} state dict"
