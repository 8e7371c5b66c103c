"""The training objective (spec section 6): v-prediction MSE over the whole latent grid, min-SNR-gamma
weighted, with offset noise and uniform timesteps.

The forward process, velocity target and SNR are `schedulers.common`'s (`add_noise`, `get_velocity`,
`snr`) on the DDPM schedule `alphas_cumprod` (T,) ('scaled_linear' betas rescaled to zero terminal SNR,
so SNR(T-1) = 0). The weight is min(SNR + 1, gamma) / (SNR + 1), finite at SNR = 0: the original's
v-prediction min-SNR weight (Moore-AnimateAnyone's training scripts, which IMAGPose follows), SNR + 1 in
both places. diffusers' `train_text_to_image.py` uses min(SNR, gamma) / (SNR + 1) instead; the two
agree where SNR >= gamma and differ below (ours is 1 for SNR <= gamma - 1, theirs SNR / (SNR + 1)).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from imagpose_jax.schedulers.common import add_noise, get_velocity, snr


def sample_noise(key: jax.Array, shape: tuple[int, ...], offset: float) -> jax.Array:
    """N(0, 1) noise of `shape` (B, h, w, C) plus offset * N(0, 1) per sample and channel."""
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, shape, jnp.float32)
    return noise + offset * jax.random.normal(k2, (shape[0], 1, 1, shape[-1]), jnp.float32)


def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
    """Uniform integer timesteps in [0, T): (B,) int32."""
    return jax.random.randint(key, (batch,), 0, num_train_timesteps, jnp.int32)


def min_snr_weight(snr: jax.Array, gamma: float) -> jax.Array:
    """The v-prediction min-SNR-gamma weight (B,): min(SNR + 1, gamma) / (SNR + 1); finite at SNR = 0."""
    return jnp.minimum(snr + 1.0, gamma) / (snr + 1.0)


def weighted_mse(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Per-sample MSE over (h, w, C) in float32, times weight (B,), averaged over the batch: a scalar."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(jnp.mean(err, axis=(1, 2, 3)) * weight)


def diffusion_loss(denoise: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array, noise: jax.Array,
                   timesteps: jax.Array, alphas_cumprod, snr_gamma: float) -> tuple[jax.Array, dict]:
    """The objective on clean latents x0 (B, h, w, C), noise (offset included) and timesteps (B,):
    x_t = add_noise(x0, noise, t), target v = get_velocity(x0, noise, t), prediction `denoise(x_t, t)`,
    loss = `weighted_mse` with the min-SNR weight. Returns (loss, {"pred", "target", "weight"})."""
    ac = jnp.asarray(alphas_cumprod)
    noisy, target = add_noise(ac, latents, noise, timesteps), get_velocity(ac, latents, noise, timesteps)
    weight = min_snr_weight(snr(ac, timesteps), snr_gamma)                  # (B,)
    pred = denoise(noisy, timesteps)
    return weighted_mse(pred, target, weight), {"pred": pred, "target": target, "weight": weight}
