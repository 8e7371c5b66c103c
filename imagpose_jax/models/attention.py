"""Multi-head attention with the diffusers `Attention` parameter layout (to_q, to_k, to_v, to_out.0).

The kernel is chosen by name so that a config can switch it per backend:
- "einsum": reference form, float32 logits and softmax, works everywhere;
- "xla": `jax.nn.dot_product_attention(implementation="xla")`;
- "cudnn": cuDNN flash attention (GPU, fp16/bf16 only);
- "auto": "cudnn" on GPU for half precision, else "einsum".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.layers import linear

IMPLS = ("auto", "einsum", "xla", "cudnn")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Softmax attention. q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "einsum"
    if impl == "einsum":
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class Attention(nnx.Module):
    """diffusers `Attention` with the default processor: no bias on q/k/v by default, bias on the output."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 bias: bool = False, impl: str = "auto", rngs: nnx.Rngs, dtype=None):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.impl = heads, impl
        self.to_q = linear(query_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_k = linear(kv_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_v = linear(kv_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_out_0 = linear(inner, query_dim, rngs=rngs, dtype=dtype)

    def split_heads(self, x: jax.Array) -> jax.Array:  # (..., L, H*D) -> (..., L, H, D)
        return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x (B, L, C), context (B, N, Cc) or None for self-attention -> (B, L, C)."""
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        out = dot_product_attention(q, k, v, self.impl)
        return self.to_out_0(out.reshape(*out.shape[:-2], -1))
