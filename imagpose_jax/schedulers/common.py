"""Noise schedule pieces shared by the samplers and training: betas, zero-terminal-SNR rescale, forward process."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The one noise schedule (spec sections 6-7): the training DDPM's, and the samplers' unless a config says otherwise.
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}

def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """(T,) float32 betas, as diffusers computes them ('linear', 'scaled_linear')."""
    if beta_schedule == "linear":
        b = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        b = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}: use 'linear' or 'scaled_linear'")
    return b.astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (diffusers' `rescale_zero_terminal_snr`): the last step has zero SNR."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32))
    a0, at = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * (a0 / (a0 - at))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """(T,) float32 cumulative alphas of a diffusers-style scheduler config (a missing `rescale_betas_zero_snr` is
    False, as in diffusers; the project's settings are `NOISE_SCHEDULE`)."""
    betas = make_betas(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                       cfg.get("beta_schedule", "scaled_linear"))
    if cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _at(ac: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """alphas_cumprod[t] for t (B,), shaped to broadcast against `like` (B, ...)."""
    return ac[t].reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def add_noise(ac: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = _at(jnp.asarray(ac), t, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def get_velocity(ac: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target: v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a = _at(jnp.asarray(ac), t, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def snr(ac: jax.Array, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t) for t (B,)."""
    a = jnp.asarray(ac)[t]
    return a / (1 - a)
