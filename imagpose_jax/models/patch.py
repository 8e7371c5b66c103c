"""Patch tokens: the reference view's VAE latents through one conv with kernel = stride = patch_size."""
from __future__ import annotations

import jax
from flax import nnx

from imagpose_jax.models.layers import conv


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.patch_size = patch_size
        self.proj = conv(in_chans, embed_dim, patch_size, stride=patch_size, padding="VALID", rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        """latents (B, hr, wr, 4) -> tokens (B, (hr/p)*(wr/p), D), row-major."""
        b, h, w, _ = latents.shape
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"reference latents {h}x{w} are smaller than one {self.patch_size}x{self.patch_size} patch")
        x = self.proj(latents)
        return x.reshape(b, -1, x.shape[-1])
