"""DDIM (Song et al. 2021) as diffusers' `DDIMScheduler` computes it: config + immutable state, pure `step`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from imagpose_jax.schedulers.common import alphas_cumprod

KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "rescale_betas_zero_snr",
        "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one", "eta"}
IGNORED = {"trained_betas", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "variance_type"}


def spaced_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Inference timesteps, first to last, as diffusers' `set_timesteps`."""
    if num_steps > num_train:
        raise ValueError(f"{num_steps} inference steps > {num_train} training timesteps")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, num_steps) * (num_train // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r}: use 'leading', 'trailing' or 'linspace'")


@dataclass(frozen=True)
class DDIM:
    """A DDIM sampler for a fixed number of steps. `step` is pure and takes a traced step index."""
    config: Mapping
    num_inference_steps: int

    def __post_init__(self):
        unknown = set(self.config) - KEYS - IGNORED
        if unknown:
            raise ValueError(f"unknown DDIM settings: {sorted(unknown)}")
        if self.config.get("thresholding", False):
            raise NotImplementedError("DDIM thresholding is not supported")
        pt = self.config.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {pt!r}")

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(dict(self.config))

    @property
    def timesteps(self) -> np.ndarray:
        c = self.config
        return spaced_timesteps(c.get("num_train_timesteps", 1000), self.num_inference_steps,
                                c.get("timestep_spacing", "leading"), c.get("steps_offset", 0))

    init_noise_sigma = 1.0

    def init_solver_state(self, sample: jax.Array) -> tuple:
        return ()  # DDIM keeps nothing between steps

    def step(self, solver: tuple, model_output: jax.Array, i: jax.Array, sample: jax.Array,
             key: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """x_t -> x_{t-1} at step index `i` (may be traced). Returns (prev_sample, solver state)."""
        c = self.config
        ac = jnp.asarray(self.alphas_cumprod)
        final = 1.0 if c.get("set_alpha_to_one", True) else ac[0]
        t = jnp.asarray(self.timesteps)[i]
        prev_t = t - c.get("num_train_timesteps", 1000) // self.num_inference_steps
        a_t = ac[t]
        a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], final)
        b_t = 1 - a_t
        pt = c.get("prediction_type", "epsilon")
        if pt == "epsilon":
            x0, eps = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5, model_output
        elif pt == "sample":
            x0 = model_output
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        else:
            x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        if c.get("clip_sample", False):
            r = c.get("clip_sample_range", 1.0)
            x0 = jnp.clip(x0, -r, r)
        eta = c.get("eta", 0.0)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std = eta * variance ** 0.5
        prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            if key is None:
                raise ValueError("DDIM with eta > 0 needs a PRNG key for its variance noise")
            prev = prev + std * jax.random.normal(key, sample.shape, sample.dtype)
        return prev.astype(sample.dtype), solver
