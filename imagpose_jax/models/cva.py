"""Cross-view attention (CVA), the local half of IMAGPose's CVA: attention across the four views of the
2x2 grid at each spatial position. Parameter layout and names of AnimateDiff's `VanillaTemporalModule`
(`temporal_transformer.{norm, proj_in, transformer_blocks.N.{attention_blocks, norms, ff, ff_norm}, proj_out}`),
the views playing the role of frames.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagpose_jax.models.layers import group_norm, layer_norm, linear
from imagpose_jax.models.transformer import FeedForward

NUM_VIEWS = 4


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
    """The standard sin/cos position table (AnimateDiff's `PositionalEncoding.pe`): (1, max_len, dim) float32."""
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    pe = np.zeros((1, max_len, dim), np.float32)
    pe[0, :, 0::2] = np.sin(position * div)
    pe[0, :, 1::2] = np.cos(position * div)
    return pe


def split_views(x: jax.Array) -> jax.Array:
    """(B, H, W, C) grid -> (B, 4, H/2, W/2, C) quadrants in slot order (row-major)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"cross-view attention needs an even feature map to split into 4 views, got {h}x{w}")
    x = x.reshape(b, 2, h // 2, 2, w // 2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, NUM_VIEWS, h // 2, w // 2, c)


def merge_views(x: jax.Array) -> jax.Array:
    """(B, 4, h, w, C) -> (B, 2h, 2w, C), the inverse of `split_views`."""
    b, _, h, w, c = x.shape
    return x.reshape(b, 2, 2, h, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)


class ViewAttention(nnx.Module):
    """Self-attention along the view axis with a sinusoidal encoding of the view index added to its input."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, pos_encoding: bool, rngs: nnx.Rngs, dtype=None):
        inner = heads * dim_head
        self.heads, self.pos_encoding = heads, pos_encoding
        self.to_q = linear(dim, inner, bias=False, rngs=rngs, dtype=dtype)
        self.to_k = linear(dim, inner, bias=False, rngs=rngs, dtype=dtype)
        self.to_v = linear(dim, inner, bias=False, rngs=rngs, dtype=dtype)
        self.to_out_0 = linear(inner, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, F, N, C): F views, N positions -> (B, F, N, C); attention over F at each position."""
        b, f, n, c = x.shape
        if self.pos_encoding:
            x = x + jnp.asarray(sinusoidal_table(f, c)[0], x.dtype)[None, :, None, :]
        split = lambda t: t.reshape(b, f, n, self.heads, -1)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bfnhd,bgnhd->bnhfg", q, k, preferred_element_type=jnp.float32) * scale
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnhfg,bgnhd->bfnhd", w, v).reshape(b, f, n, -1)
        return self.to_out_0(out)


class TemporalTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, num_attention_blocks: int, *, pos_encoding: bool,
                 rngs: nnx.Rngs, dtype=None):
        self.attention_blocks = nnx.List([ViewAttention(dim, heads, dim_head, pos_encoding=pos_encoding, rngs=rngs, dtype=dtype)
                                          for _ in range(num_attention_blocks)])
        self.norms = nnx.List([layer_norm(dim, rngs=rngs, dtype=dtype) for _ in range(num_attention_blocks)])
        self.ff = FeedForward(dim, rngs=rngs, dtype=dtype)
        self.ff_norm = layer_norm(dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, F, N, C)
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nnx.Module):
    def __init__(self, channels: int, heads: int, num_layers: int, num_attention_blocks: int, *, pos_encoding: bool,
                 norm_num_groups: int, dim_div: int = 1, rngs: nnx.Rngs, dtype=None):
        dim_head = channels // heads // dim_div
        inner = heads * dim_head
        self.norm = group_norm(channels, norm_num_groups, 1e-6, rngs=rngs, dtype=dtype)   # eps as AnimateDiff's
        self.proj_in = linear(channels, inner, rngs=rngs, dtype=dtype)
        self.transformer_blocks = nnx.List([
            TemporalTransformerBlock(inner, heads, dim_head, num_attention_blocks, pos_encoding=pos_encoding,
                                     rngs=rngs, dtype=dtype) for _ in range(num_layers)])
        self.proj_out = linear(inner, channels, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, 4, h, w, C) views -> (B, 4, h, w, C)."""
        b, f, h, w, c = x.shape
        hs = self.norm(x.reshape(b * f, h, w, c))            # GroupNorm per view
        hs = self.proj_in(hs.reshape(b, f, h * w, c))        # (B, 4, N, C')
        for block in self.transformer_blocks:
            hs = block(hs)
        return self.proj_out(hs).reshape(b, f, h, w, c) + x


class CrossViewAttention(nnx.Module):
    """One CVA module: split the grid into its 4 views, attend across views, tile them back."""

    def __init__(self, channels: int, *, num_attention_heads: int = 8, num_transformer_block: int = 1,
                 attention_block_types=("Temporal_Self", "Temporal_Self"), temporal_position_encoding: bool = True,
                 temporal_position_encoding_max_len: int = 32, temporal_attention_dim_div: int = 1,
                 norm_num_groups: int = 32, rngs: nnx.Rngs, dtype=None):
        """The keyword arguments are AnimateDiff's motion-module settings (`motion_module_kwargs`), with its defaults:
        `norm_num_groups` is its TemporalTransformer3DModel's GroupNorm."""
        for t in attention_block_types:
            if t != "Temporal_Self":
                raise NotImplementedError(f"CVA attention block type {t!r} is not supported (only 'Temporal_Self')")
        if temporal_position_encoding and temporal_position_encoding_max_len < NUM_VIEWS:
            raise ValueError(f"temporal_position_encoding_max_len={temporal_position_encoding_max_len} < {NUM_VIEWS} views")
        self.pe_max_len = temporal_position_encoding_max_len
        self.temporal_transformer = TemporalTransformer(
            channels, num_attention_heads, num_transformer_block, len(attention_block_types),
            pos_encoding=temporal_position_encoding, norm_num_groups=norm_num_groups, dim_div=temporal_attention_dim_div,
            rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, C) grid features -> (B, H, W, C)."""
        return merge_views(self.temporal_transformer(split_views(x)))
