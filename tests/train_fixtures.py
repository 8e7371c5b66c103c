"""Shared pieces of the training tests: tiny configs, a fixed synthetic batch, diffusers' training schedule.

`imagpose_jax.models.vae` is being written in parallel; until it exists the tests use `StandInVAE` (a
stride-8 conv giving a Gaussian posterior, with the real VAE's `encode_latents` contract) and say so.
"""
from __future__ import annotations

import importlib.util
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagpose_jax.data.index import read_imagpose_json
from imagpose_jax.data.pipeline import make_train_iterator
from imagpose_jax.data.synthetic import make_synthetic_dataset
from imagpose_jax.train import config as tc
from imagpose_jax.train.step import TrainStep, host_batch
from imagpose_jax.train.state import init_train_state
from imagpose_jax.sharding import batch_sharding, make_mesh

REAL_VAE = importlib.util.find_spec("imagpose_jax.models.vae") is not None


class StandInVAE(nnx.Module):
    """Test stand-in for `AutoencoderKL.encode_latents`: x (B, H, W, 3) -> (B, H/8, W/8, 4) x 0.18215."""

    def __init__(self, _config: dict, keys):
        self.quant = nnx.Conv(3, 8, (8, 8), strides=(8, 8), padding="VALID", rngs=keys)

    def encode_latents(self, x, key=None):
        mean, logvar = jnp.split(self.quant(x), 2, axis=-1)
        if key is not None:
            mean = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mean.shape, mean.dtype)
        return mean * 0.18215


def make_vae():
    return tc.default_vae if REAL_VAE else StandInVAE


def diffusers_alphas_cumprod() -> np.ndarray:
    """diffusers' DDPM training schedule (the reference): scaled_linear 0.00085 -> 0.012, zero terminal SNR."""
    from diffusers import DDPMScheduler
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      rescale_betas_zero_snr=True, prediction_type="v_prediction")
    return s.alphas_cumprod.numpy().astype(np.float32)


def tiny_config(stage: int, **step_overrides):
    c = tc.base_config(stage, "tiny")
    c.step.update(step_overrides)
    return c


def tiny_batch(batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """One fixed batch of 64x64 synthetic views through the real data pipeline (grids 128x128)."""
    with tempfile.TemporaryDirectory() as d:
        files = make_synthetic_dataset(d, num_persons=3, poses_per_person=3, height=64, width=64, seed=seed,
                                       test_fraction=0.0)
        it = make_train_iterator(read_imagpose_json(files["train"].index_json), 64, 64, batch_size=batch_size,
                                 seed=seed)
        return host_batch(next(it))


def build(c, mesh=None):
    """(graphdef, state, shardings, TrainStep) for config `c` on `mesh` (default: one device)."""
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    graphdef, state, shardings = init_train_state(tc.state_builder(c, make_vae()), mesh)
    step = TrainStep(graphdef, tc.step_config(c), tc.training_schedule(c), shardings=shardings,
                     batch_sharding=batch_sharding(mesh))
    return graphdef, state, shardings, step
