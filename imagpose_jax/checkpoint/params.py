"""A parameter folder: `config.json` (the model's settings) + `params.safetensors` (flat, dotted state paths).

This is what the converter writes and what inference loads. It needs no PyTorch. Loading checks every
key and shape against the model built abstractly from `config.json` (`nnx.eval_shape`), so a folder
that does not match its config is an error naming the key; a damaged (e.g. truncated) file is an error
naming it, and a NaN or inf is neither written nor loaded (`finite.py`: the error names the tensor).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

from imagpose_jax.checkpoint.finite import check_finite

M = TypeVar("M")
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def flat_values(state: nnx.State) -> dict[str, Any]:
    """Dotted state path -> its array, as held (numpy, or a jax array on its devices)."""
    return {_key(p): v.get_value() if hasattr(v, "get_value") else v for p, v in nnx.to_flat_state(state)}


def save_params(folder: str | os.PathLike, config: dict, params: nnx.State) -> None:
    """Writes `params` (an `nnx.State` of arrays) and the JSON-able `config` into `folder`; a non-finite tensor is
    refused (`NonFiniteParamsError`, nothing written)."""
    from safetensors.numpy import save_file
    flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flat_values(params).items()}
    check_finite(flat, f"{os.path.join(folder, PARAMS_FILE)} not written")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, PARAMS_FILE + ".tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(folder, PARAMS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1)


def read_config(folder: str | os.PathLike) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a converted parameter folder (run `imagpose-convert` first)")
    with open(path) as f:
        return json.load(f)


def load_params(folder: str | os.PathLike, abstract: nnx.State, prefix: str = "", dtype=None,
                shardings: nnx.State | None = None) -> nnx.State:
    """Fills `abstract` (e.g. `nnx.state(nnx.eval_shape(...), nnx.Param)`) from `folder`, strictly.

    Each tensor is cast to `dtype` (default: its abstract leaf's dtype) as it is read, on the host, before it
    goes to the device: a model built in bfloat16 is loaded with no float32 copy of its weights, whatever dtype
    the file holds. With `shardings` (same structure, `NamedSharding` leaves) every array is assembled from the
    slices this host's devices hold (`jax.make_array_from_callback` over safetensors' lazy slices): no host reads
    or builds a whole sharded tensor. A tensor holding NaN or inf is an error naming it (`NonFiniteParamsError`).
    """
    path = os.path.join(folder, PARAMS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: missing weights")
    flat_sh = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    out, missing, wrong = [], [], []

    def finite(k: str, a: np.ndarray) -> np.ndarray:
        check_finite({k: a}, path)
        return a
    with _open_safetensors(path) as f:
        keys = set(f.keys())
        wanted = set()
        for p, var in nnx.to_flat_state(abstract):
            k = prefix + _key(p)
            wanted.add(k)
            if k not in keys:
                missing.append(k)
                continue
            sl = f.get_slice(k)
            if tuple(sl.get_shape()) != tuple(var.shape):
                wrong.append(f"{k}: file {tuple(sl.get_shape())}, model {tuple(var.shape)}")
                continue
            dt = dtype or var.dtype
            if p in flat_sh:
                sh = flat_sh[p]
                sh = sh.get_value() if hasattr(sh, "get_value") else sh
                value = jax.make_array_from_callback(tuple(var.shape), sh,
                                                     lambda idx, sl=sl, dt=dt, k=k: finite(k, np.asarray(sl[idx], dt)))
            else:
                value = jax.device_put(finite(k, f.get_tensor(k).astype(dt, copy=False)))
            out.append((p, var.replace(value)))
        unexpected = sorted(k for k in keys - wanted if k.startswith(prefix))
    if missing or wrong or unexpected:
        raise ValueError(f"{path} does not match its model: missing {missing[:10]}, shape mismatches {wrong[:10]}, "
                         f"unexpected {unexpected[:10]}")
    return nnx.from_flat_state(out)


@contextlib.contextmanager
def _open_safetensors(path: str):
    """safetensors' `safe_open`, a damaged file (truncated, or not safetensors) an error naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(f"{path} is damaged ({os.path.getsize(path)} bytes; truncated, or not a safetensors "
                         f"file?): {err}. Convert or export it again") from None


def load_module(folder: str | os.PathLike, build: Callable[[dict, object], M]) -> M:
    """`build(config, rngs)` (config: the folder's config.json) with the folder's weights. The module is built
    abstractly (`nnx.eval_shape`: nothing allocated) and each tensor read straight into the dtype `build` gives
    its parameter (`load_params`)."""
    from imagpose_jax.models.init import abstract
    config = read_config(folder)
    model = abstract(lambda k: build(config, k))
    nnx.update(model, load_params(folder, nnx.state(model, nnx.Param)))
    return model


def load_model(folder: str | os.PathLike, dtype=None):
    """An `IMAGPose` model with the weights of a converted folder, and its config. `dtype`: the model's weight and
    compute dtype (`models.layers.parse_dtype`; None: float32)."""
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.layers import parse_dtype
    cfg, dtype = IMAGPoseConfig.from_case(read_config(folder)), parse_dtype(dtype)
    return load_module(folder, lambda _, k: IMAGPose(cfg, rngs=k, dtype=dtype)), cfg
