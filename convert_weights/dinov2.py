"""DINOv2 in the transformers folder layout (`config.json` + `model.safetensors` or `pytorch_model.bin`) <->
`imagpose_jax.models.dinov2.Dinov2Model`.

Our parameter paths are the transformers state-dict keys, so the generic strict mapping of
`convert_weights.core` needs no renames and no skips: every key must be loaded. `embeddings.mask_token`
is loaded as a parameter (the model uses it only when called with `bool_masked_pos`), which keeps the
export an exact round trip.
"""
from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from convert_weights.core import load_torch_file, nnx_to_torch, save_torch_file, torch_to_nnx
from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
from imagpose_jax.models.init import abstract

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(folder: str | os.PathLike, **overrides) -> Dinov2Config:
    """`folder/config.json` -> Dinov2Config; `overrides` set fields (e.g. `pos_interpolation="size"`)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINOv2 folder {os.fspath(folder)!r} has no config.json")
    with open(path) as f:
        return Dinov2Config.from_dict(json.load(f), **overrides)


def weights_file(folder: str | os.PathLike) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"DINOv2 folder {os.fspath(folder)!r} has none of {WEIGHT_FILES}")


def load_dinov2(folder: str | os.PathLike, *, dtype=None, attn_impl: str = "auto",
                **config_overrides) -> tuple[Dinov2Config, Dinov2Model]:
    """A transformers `Dinov2Model.save_pretrained` folder -> (config, model with its weights).

    Raises ConversionError naming every missing, unexpected or mis-shaped key.
    """
    cfg = read_config(folder, **config_overrides)
    path = weights_file(folder)
    model = abstract(lambda k: Dinov2Model(cfg, rngs=k, dtype=dtype, attn_impl=attn_impl))
    nnx.update(model, torch_to_nnx(nnx.state(model, nnx.Param), load_torch_file(path), source=path))
    return cfg, model


def export_dinov2(model: Dinov2Model, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Our model -> the transformers state dict (numpy); also written to `path` (.safetensors or .bin) if given."""
    sd = nnx_to_torch(nnx.state(model, nnx.Param))
    if path is not None:
        save_torch_file(sd, path)
    return sd

