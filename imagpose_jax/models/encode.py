"""The frozen encoders' part of the conditioning, shared by the train step and the sampler.

`encode(vae, dino, batch)` runs the VAE on the masked grid (built here from `batch.grid` and `batch.known`) and
on the reference, and DINOv2 on `batch.dino_pixels`; with `target_key` it also encodes the whole grid, sampling
the posterior (the training targets), in the same VAE call as the masked grid (same shape).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from imagpose_jax.models.imagpose import slot_mask


class Encoded(NamedTuple):
    image_embeds: jax.Array          # (B, 257, D) DINOv2 tokens
    ref_latents: jax.Array           # (B, hr, wr, 4) reference posterior mean x scaling factor
    masked_latents: jax.Array        # (B, h, w, 4) masked-grid posterior mean x scaling factor
    targets: jax.Array | None        # (B, h, w, 4) whole-grid posterior sample x scaling factor (training only)


def masked_grid(grid: jax.Array, known: jax.Array) -> jax.Array:
    """grid (B, 2H, 2W, 3) in [-1, 1] -> the same with -1 (black) over the unknown slots."""
    return jnp.where(slot_mask(known, *grid.shape[1:3]) > 0, grid, jnp.asarray(-1.0, grid.dtype))


def encode(vae, dino, batch, *, target_key: jax.Array | None = None, dtype=None) -> Encoded:
    """batch: a `data.batch.Batch` of arrays. `dtype`: the inputs' compute dtype (default: as given)."""
    def cast(x):
        return x if dtype is None else x.astype(dtype)
    grid = cast(batch.grid)
    masked = masked_grid(grid, batch.known)
    sf = vae.cfg.scaling_factor
    if target_key is None:
        targets, masked_latents = None, vae.encode(masked)[0] * sf
    else:
        b = grid.shape[0]
        mean, logvar = vae.encode(jnp.concatenate([grid, masked]))        # one call: (2B, h, w, 4)
        targets = vae.sample_posterior(mean[:b], logvar[:b], target_key) * sf
        masked_latents = mean[b:] * sf
    return Encoded(image_embeds=dino(cast(batch.dino_pixels)), ref_latents=vae.encode_latents(cast(batch.ref_pixels)),
                   masked_latents=masked_latents, targets=targets)
