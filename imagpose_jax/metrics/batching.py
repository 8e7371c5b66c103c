"""Running a metric over many images: fixed-size batches (the last one padded by repetition, so one compiled
program serves every batch), modules jitted once per structure."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def batched(fn: Callable, arrays: Sequence, batch_size: int) -> np.ndarray:
    """np.concatenate([fn(*batch) for each batch of `batch_size` along axis 0 of every array])."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = [np.asarray(a) for a in arrays]
    n = arrays[0].shape[0]
    out = []
    for i in range(0, n, batch_size):
        chunk = [a[i:i + batch_size] for a in arrays]
        m = chunk[0].shape[0]
        if m < batch_size and n > batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
        out.append(fn(*[jnp.asarray(c) for c in chunk])[:m])  # stays on the device: no sync per batch
    return np.concatenate(jax.device_get(out))


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, kwargs: tuple) -> Callable:
    kw = dict(kwargs)
    return jax.jit(lambda state, *xs: nnx.merge(graphdef, state)(*xs, check_range=False, **kw))


def apply_batched(module: nnx.Module, arrays: Sequence, batch_size: int, **kwargs) -> np.ndarray:
    """`module(*batch, check_range=False, **kwargs)` over batches, jitted (compiled once per module structure,
    input shape and kwargs). The caller checks the value range first."""
    graphdef, state = nnx.split(module)
    f = _compiled(graphdef, tuple(sorted(kwargs.items())))
    return batched(lambda *xs: f(state, *xs), arrays, batch_size)
