"""Building models abstractly or concretely, fast.

`nnx.Rngs` keeps a counter Variable that every parameter initialiser updates; under `nnx.eval_shape`/`jit`
(flax 0.12, jax 0.10) each update inspects the tracer's `sharding`, which builds an error message by walking
the whole trace so far: construction becomes quadratic in the parameter count (58 s for the tiny golden
model, against 1.7 s here). `ParamKeys` hands out the same kind of per-parameter keys from a Python
counter instead; modules only ever call `rngs.params()`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


class ParamKeys:
    """A stand-in for `nnx.Rngs` during construction: `params()` returns fold_in(key(seed), n) for n = 1, 2, ..."""

    def __init__(self, seed: int = 0):
        self._key, self._n = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        self._n += 1
        return jax.random.fold_in(self._key, self._n)

    __call__ = params


def abstract(ctor: Callable[[ParamKeys], M]) -> M:
    """The module `ctor(rngs)` with shape/dtype placeholders instead of arrays (no allocation)."""
    return nnx.eval_shape(lambda: ctor(ParamKeys(0)))

