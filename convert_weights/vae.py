"""SD's VAE: a diffusers `AutoencoderKL` folder (config.json + safetensors or .bin), or a single file in the
original LDM layout (`convert_weights/single_file.py`), <-> our params, strictly."""
from __future__ import annotations

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


def vae_config(src: str | os.PathLike, config=None) -> dict:
    """The diffusers config of the VAE at `src`: a folder's own config.json; for a single file `config` (a dict, a
    config.json or the folder holding it), by default SD1.5's."""
    from convert_weights.single_file import SD15_VAE_CONFIG, read_config
    if os.path.isdir(src):
        if config is not None:
            raise ValueError(f"{src} is a diffusers folder with its own config.json: a VAE config is only for single files")
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(f"{src}/config.json not found: expected a diffusers AutoencoderKL folder")
        return read_config(src, {})
    return read_config(config, SD15_VAE_CONFIG)


def load_vae(src: str | os.PathLike, dtype=None, config=None) -> tuple[VAEConfig, AutoencoderKL]:
    """A diffusers AutoencoderKL folder, or a single file (a whole SD checkpoint's `first_stage_model.*`, or a
    standalone VAE file such as vae-ft-mse-840000-ema-pruned.safetensors) with `config` (see `vae_config`) -> our VAE."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} not found: expected a diffusers AutoencoderKL folder or a single VAE/SD file")
    config = vae_config(src, config)
    cfg = VAEConfig.from_dict(config)
    model = abstract(lambda k: AutoencoderKL(cfg, rngs=k, dtype=dtype))
    if os.path.isdir(src):
        file = weights_file(src)
        sd, origins = _modernise(load_torch_file(file)), None
    else:
        from convert_weights.single_file import ldm_vae
        file = src
        sd, origins = ldm_vae(load_torch_file(file), config, source=file)
    nnx.update(model, torch_to_nnx(nnx.state(model, nnx.Param), sd, renames=RENAMES, source=file, origins=origins))
    return cfg, model


def export_vae(model: AutoencoderKL) -> dict[str, np.ndarray]:
    """Our VAE -> a diffusers state dict (numpy)."""
    return nnx_to_torch(nnx.state(model, nnx.Param), renames=RENAMES)
