"""The spatial transformer of SD's UNet: diffusers' `Transformer2DModel` with one `BasicTransformerBlock`."""
from __future__ import annotations

import jax
from flax import nnx

from imagpose_jax.models.attention import Attention
from imagpose_jax.models.layers import conv, gelu, group_norm, layer_norm, linear


class GEGLU(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=None):
        self.proj = linear(cin, 2 * cout, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jax.numpy.split(self.proj(x), 2, axis=-1)
        return h * gelu(gate)


class FeedForward(nnx.Module):
    """diffusers `FeedForward` with GEGLU: net.0 (GEGLU, inner width mult*dim), net.2 (Linear)."""

    def __init__(self, dim: int, mult: int = 4, *, rngs: nnx.Rngs, dtype=None):
        self.net_0 = GEGLU(dim, dim * mult, rngs=rngs, dtype=dtype)
        self.net_2 = linear(dim * mult, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, *, only_cross_attention: bool = False,
                 attn_impl: str = "auto", rngs: nnx.Rngs, dtype=None):
        self.only_cross_attention = only_cross_attention
        self.norm1 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               impl=attn_impl, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, impl=attn_impl,
                               rngs=rngs, dtype=dtype)
        self.norm3 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.ff = FeedForward(dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x (B, L, C), context (B, N, Cc)."""
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in (1x1 conv, or linear) -> transformer block over all H*W tokens -> proj_out, + input."""

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, *, groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False, attn_impl: str = "auto",
                 rngs: nnx.Rngs, dtype=None):
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(channels, groups, 1e-6, rngs=rngs, dtype=dtype)
        proj = (lambda: linear(channels, channels, rngs=rngs, dtype=dtype)) if use_linear_projection else \
            (lambda: conv(channels, channels, 1, rngs=rngs, dtype=dtype))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([BasicTransformerBlock(
            channels, heads, channels // heads, cross_attention_dim, only_cross_attention=only_cross_attention,
            attn_impl=attn_impl, rngs=rngs, dtype=dtype)])
        self.proj_out = proj()

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x (B, H, W, C), context (B, N, Cc) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        hs = self.proj_in(self.norm(x)).reshape(b, h * w, c)  # 1x1 conv and linear commute with the reshape
        for block in self.transformer_blocks:
            hs = block(hs, context)
        return self.proj_out(hs.reshape(b, h, w, c)) + x
