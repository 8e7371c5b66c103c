"""SD's VAE: a diffusers `AutoencoderKL` folder (config.json + safetensors or .bin) <-> our params, strictly."""
from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from convert_weights.core import load_torch_file, nnx_to_torch, torch_to_nnx
from imagpose_jax.models.init import abstract
from imagpose_jax.models.vae import AutoencoderKL, VAEConfig

RENAMES = (("to_out_0", "to_out.0"),)
# Old SD VAE .bin files name the mid-block attention's layers the pre-0.14 diffusers way.
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modernise(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in OLD_ATTENTION:
            k = ".".join(parts[:-2] + [OLD_ATTENTION[parts[-2]], parts[-1]])
            if v.ndim == 4:  # old files sometimes store these linears as 1x1 convs
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def weights_file(folder: str | os.PathLike) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {folder}")


def load_vae(folder: str | os.PathLike, dtype=None) -> tuple[VAEConfig, AutoencoderKL]:
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a diffusers AutoencoderKL folder")
    with open(path) as f:
        cfg = VAEConfig.from_dict(json.load(f))
    file = weights_file(folder)
    model = abstract(lambda k: AutoencoderKL(cfg, rngs=k, dtype=dtype))
    nnx.update(model, torch_to_nnx(nnx.state(model, nnx.Param), _modernise(load_torch_file(file)), renames=RENAMES, source=file))
    return cfg, model


def export_vae(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """Our VAE -> a diffusers state dict (numpy)."""
    return nnx_to_torch(nnx.state(model, nnx.Param), renames=RENAMES)
