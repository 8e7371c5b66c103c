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


def init_compiler_options(platform: str) -> dict | None:
    """XLA options for a program that builds parameters, run once: on XLA:CPU without LLVM's optimisations, whose
    code generation is most of its cost there (the tiny stage-2 train state: 57 s instead of 122 s, measured beside
    another compile; its run time is negligible either way)."""
    return {"xla_backend_optimization_level": 0} if platform == "cpu" else None


def jit_state(build: Callable[[], nnx.Module], shardings: nnx.State | None = None) -> nnx.State:
    """The state of `build()`, its parameters drawn in one jitted program (built eagerly, each initialiser of each
    shape compiles on its own: ~100 programs for the demo's denoiser), placed by `shardings` (default: the default
    device) and compiled as `init_compiler_options` says for their platform."""
    leaves = jax.tree.leaves(shardings)
    platform = leaves[0].mesh.devices.flat[0].platform if leaves else jax.devices()[0].platform
    return jax.jit(lambda: nnx.state(build()), out_shardings=shardings,
                   compiler_options=init_compiler_options(platform))()


def concrete(ctor: Callable[[ParamKeys], M], seed: int = 0) -> M:
    """The module `ctor(ParamKeys(seed))`, its parameters drawn in one jitted program (`jit_state`)."""
    return nnx.merge(nnx.graphdef(abstract(ctor)), jit_state(lambda: ctor(ParamKeys(seed))))
