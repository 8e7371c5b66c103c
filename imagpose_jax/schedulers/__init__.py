"""Samplers as config + immutable state with a pure `step`, so the whole denoising loop jits.

Every sampler made by `make_scheduler(name, config, num_inference_steps)` offers:
  timesteps (np.ndarray, first to last), init_noise_sigma,
  init_solver_state(sample) -> pytree carried between steps,
  step(solver_state, model_output, i, sample, key) -> (prev_sample, solver_state), `i` a (traced) step index.
`config` uses diffusers' scheduler keys (beta_schedule, prediction_type, timestep_spacing, ...).
"""
from __future__ import annotations

from collections.abc import Mapping

from imagpose_jax.schedulers.common import add_noise, alphas_cumprod, get_velocity, make_betas, rescale_zero_terminal_snr, snr
from imagpose_jax.schedulers.ddim import DDIM, spaced_timesteps
from imagpose_jax.schedulers.dpm_solver import DPMSolverMultistep, dpm_timesteps

SCHEDULERS = {"ddim": DDIM, "dpmsolver++": DPMSolverMultistep}


def make_scheduler(name: str, config: Mapping, num_inference_steps: int):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; available: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](dict(config), num_inference_steps)


__all__ = ["DDIM", "DPMSolverMultistep", "SCHEDULERS", "add_noise", "alphas_cumprod", "dpm_timesteps", "get_velocity",
           "make_betas", "make_scheduler", "rescale_zero_terminal_snr", "snr", "spaced_timesteps"]
