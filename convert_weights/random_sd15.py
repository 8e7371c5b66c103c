"""Random-weight *training-init* inputs at full size, in the formats `imagpose-convert sd15` reads: a diffusers
SD1.5 `unet/` folder (diffusers' own random initialisation) and an AnimateDiff-style motion module for the 21
CVA modules. Shared by the full-size conversion test and `benchmarks/converter.py`.
"""
from __future__ import annotations

import os

import numpy as np
from flax import nnx


def write_sd15_unet_and_motion_module(out: str | os.PathLike, seed: int = 0, std: float = 0.02) -> tuple[str, str]:
    """Writes `out/unet/` (config.json + safetensors) and `out/mm.ckpt`; returns their paths."""
    import torch
    from diffusers import UNet2DConditionModel

    from convert_weights.core import save_torch_file, to_torch_layout, torch_key
    from convert_weights.imagpose import UNET_RENAMES
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.unet import UNet
    from imagpose_jax.models.unet_config import UNetConfig

    out = os.fspath(out)
    unet_dir, mm_path = os.path.join(out, "unet"), os.path.join(out, "mm.ckpt")
    torch.manual_seed(seed)
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_pretrained(unet_dir)
    shapes = nnx.state(abstract(lambda k: UNet(UNetConfig(use_cva=True), rngs=k)), nnx.Param)
    rng = np.random.default_rng(seed)
    mm = {torch_key(p, UNET_RENAMES): to_torch_layout(str(p[-1]), rng.standard_normal(v.shape, np.float32) * std)
          for p, v in nnx.to_flat_state(shapes) if "motion_modules" in p}
    save_torch_file(mm, mm_path)
    return unet_dir, mm_path
