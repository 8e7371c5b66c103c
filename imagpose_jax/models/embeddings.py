"""Sinusoidal timestep embedding and the time-embedding MLP, as diffusers' `Timesteps`/`TimestepEmbedding`."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.layers import activation, linear


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """t (B,) -> (B, dim) float32, diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, dim: int, act_fn: str = "silu", *, rngs: nnx.Rngs, dtype=None):
        self.linear_1 = linear(cin, dim, rngs=rngs, dtype=dtype)
        self.linear_2 = linear(dim, dim, rngs=rngs, dtype=dtype)
        self.act = activation(act_fn)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))
