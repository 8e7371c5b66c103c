"""Thin constructors for the Flax layers every model here uses, with PyTorch's semantics.

Norms use the two-pass variance (PyTorch's), not Flax's default E[x^2] - E[x]^2, so that float32
results match the original to ~1e-6. Convolutions take PyTorch's symmetric integer padding.

`dtype` (every model's constructor passes it down to these): None builds the float32 model training keeps (its
step casts the weights to its compute dtype itself); a dtype builds the model in it, weights and compute (what
inference loads: `checkpoint.params.load_module`), with float32 kept where it matters: norm statistics (Flax
computes them, and the normalisation, in float32 and casts the result) and the attention logits and softmax
(`models.attention`, `models.cva`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

zeros = nnx.initializers.zeros_init()
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype) -> jnp.dtype | None:
    """A dtype or its name (one of `DTYPES`) -> the models' `dtype` argument: None for float32 (their default, so
    that a float32 model is the same graph however it was asked for), else the dtype. Others are an error listing
    the choices."""
    name = "float32" if dtype is None else dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return None if name == "float32" else jnp.dtype(DTYPES[name])


def weights(dtype) -> jnp.dtype:
    """The parameter dtype of a module built with `dtype` (see the module docstring)."""
    return jnp.dtype(jnp.float32 if dtype is None else dtype)


def weight_dtype(module: nnx.Module) -> jnp.dtype:
    """The dtype of a module's parameters (their promoted type, should they differ): a loaded model's compute dtype."""
    return jnp.dtype(jnp.result_type(*(x.dtype for x in jax.tree.leaves(nnx.state(module, nnx.Param)))))


def conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: int | str | tuple = 0, rngs: nnx.Rngs,
         dtype=None, zero_init: bool = False) -> nnx.Conv:
    """PyTorch-style Conv2d on NHWC: `padding` is the symmetric pixel padding (or a Flax padding spec)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    kw = dict(kernel_init=zeros, bias_init=zeros) if zero_init else {}
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=pad, dtype=dtype, param_dtype=weights(dtype),
                    rngs=rngs, **kw)


def linear(cin: int, cout: int, *, bias: bool = True, rngs: nnx.Rngs, dtype=None,
           zero_init: bool = False) -> nnx.Linear:
    kw = dict(kernel_init=zeros, bias_init=zeros) if zero_init else {}
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=weights(dtype), rngs=rngs, **kw)


def group_norm(c: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=None) -> nnx.GroupNorm:
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=weights(dtype), rngs=rngs)


def layer_norm(c: int, eps: float = 1e-5, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=weights(dtype), rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU (exact, erf-based); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu, "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
