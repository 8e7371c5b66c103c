"""Pretrained weights into the sharded train state: converted parameter folders (`imagpose-convert`), read
strictly (every key and shape checked, a NaN or inf refused) and slice by slice onto the devices that hold them;
`init.vae` may also be a single VAE or SD file (converted on the host with the run's VAE settings, then placed)."""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
from flax import nnx

from imagpose_jax.checkpoint.finite import check_finite
from imagpose_jax.checkpoint.params import flat_values, load_params, read_config

PARTS = {"model": "model", "vae": "vae", "image_encoder": "dino"}  # config.init key -> TrainState attribute


def _check_model_config(folder: str, c: ml_collections.ConfigDict) -> None:
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    from imagpose_jax.train.config import model_config
    theirs, ours = IMAGPoseConfig.from_case(read_config(folder)).to_dict(), model_config(c).to_dict()
    for d in (theirs, ours):
        d["unet_config"].pop("attn_impl", None)  # a runtime choice, not part of the weights
    diff = {f"{part}.{k}": (theirs[part].get(k), v) for part in ours for k, v in ours[part].items()
            if theirs[part].get(k) != v}
    if diff:
        raise ValueError(f"{folder}: its model settings differ from the config's (folder, config): "
                         f"{json.dumps(diff, default=str)[:800]}")


def load_pretrained(state: nnx.State, shardings: nnx.State, c: ml_collections.ConfigDict) -> nnx.State:
    """`state` with the parameters of `c.init.{model, vae, image_encoder}` (those given) loaded in place of
    the random ones; the EMA (if any) restarts from the loaded weights."""
    for key, attr in PARTS.items():
        folder = c.init.get(key, "")
        if not folder:
            logging.warning("init.%s is not set: the %s starts from random weights", key, attr)
            continue
        if key == "model":
            _check_model_config(folder, c)
        if key == "vae" and os.path.isfile(folder):
            params = _vae_from_file(folder, c, _params(state[attr]), _params(shardings[attr]))
        else:
            params = load_params(folder, _params(state[attr]), shardings=_params(shardings[attr]))
        _merge(state[attr], params)
        if key == "model" and "ema" in state and state["ema"] is not None:
            _merge(state["ema"], _subset(params, state["ema"]))
    return state


def _vae_from_file(path: str, c: ml_collections.ConfigDict, like: nnx.State, shardings: nnx.State) -> nnx.State:
    """A single-file VAE (a whole SD checkpoint or e.g. vae-ft-mse-840000-ema-pruned.safetensors), converted strictly
    with `c.vae` as its diffusers config (diffusers' mapping: the `torch` extra), in the dtypes of `like`, onto `shardings`."""
    from convert_weights.vae import load_vae
    _, vae = load_vae(path, config=c.vae.to_dict())
    params = nnx.state(vae, nnx.Param)
    check_finite(flat_values(params), f"init.vae {path}")  # (a parameter folder is checked as it is read)
    like, sh = dict(nnx.to_flat_state(like)), dict(nnx.to_flat_state(shardings))
    return nnx.from_flat_state([(p, jax.device_put(v.get_value().astype(like[p].get_value().dtype), sh[p].get_value()))
                                for p, v in nnx.to_flat_state(params)])


def _params(sub: nnx.State) -> nnx.State:
    return nnx.filter_state(sub, nnx.Param)


def _merge(target: nnx.State, values: nnx.State) -> None:
    """Writes the leaves of `values` into `target` (same paths), keeping each target Variable's type."""
    flat = dict(nnx.to_flat_state(target))
    for path, v in nnx.to_flat_state(values):
        flat[path].set_value(v.get_value() if hasattr(v, "get_value") else v)


def _subset(values: nnx.State, like: nnx.State) -> nnx.State:
    paths = {p for p, _ in nnx.to_flat_state(like)}
    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(values) if p in paths])
