"""Thin constructors for the Flax layers every model here uses, with PyTorch's semantics.

Norms use the two-pass variance (PyTorch's), not Flax's default E[x^2] - E[x]^2, so that float32
results match the original to ~1e-6. Convolutions take PyTorch's symmetric integer padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

zeros = nnx.initializers.zeros_init()


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int | str | tuple = 0, rngs: nnx.Rngs,
         dtype=None, zero_init: bool = False) -> nnx.Conv:
    """PyTorch-style Conv2d on NHWC: `padding` is the symmetric pixel padding (or a Flax padding spec)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    kw = dict(kernel_init=zeros, bias_init=zeros) if zero_init else {}
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, dtype=dtype, rngs=rngs, **kw)


def linear(cin: int, cout: int, *, bias: bool = True, rngs: nnx.Rngs, dtype=None,
           zero_init: bool = False) -> nnx.Linear:
    kw = dict(kernel_init=zeros, bias_init=zeros) if zero_init else {}
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, rngs=rngs, **kw)


def group_norm(c: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=None) -> nnx.GroupNorm:
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


def layer_norm(c: int, eps: float = 1e-5, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU (exact, erf-based); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
