"""Shared pieces of the training tests: tiny configs, a fixed synthetic batch, diffusers' training schedule."""
from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from imagpose_jax.data.index import read_imagpose_json
from imagpose_jax.data.pipeline import make_train_iterator
from imagpose_jax.data.synthetic import make_synthetic_dataset
from imagpose_jax.train import config as tc
from imagpose_jax.data.batch import Batch, as_batch
from imagpose_jax.train.state import init_train_state
from imagpose_jax.sharding import make_mesh
from imagpose_jax.testing import drawn_train_state

def diffusers_alphas_cumprod() -> np.ndarray:
    """diffusers' DDPM training schedule (the reference): scaled_linear 0.00085 -> 0.012, zero terminal SNR."""
    from diffusers import DDPMScheduler
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      rescale_betas_zero_snr=True, prediction_type="v_prediction")
    return s.alphas_cumprod.numpy().astype(np.float32)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(stage: int, **step_overrides):
    """`configs/stage{stage}.py:tiny`, as `imagpose train` reads it, with `c.step` overrides."""
    c = tc.load_config(os.path.join(ROOT, f"configs/stage{stage}.py:tiny"))
    c.step.update(step_overrides)
    return c


def demo_config():
    """configs/demo.py, as `imagpose demo` reads it (the factor-4 demo VAE, its three-stage pose guider)."""
    return tc.load_config(os.path.join(ROOT, "configs/demo.py"))


def tiny_batch(batch_size: int = 2, seed: int = 0) -> Batch:
    """One fixed batch of 64x64 synthetic views through the real data pipeline (grids 128x128)."""
    with tempfile.TemporaryDirectory() as d:
        files = make_synthetic_dataset(d, num_persons=3, poses_per_person=3, height=64, width=64, seed=seed,
                                       test_fraction=0.0)
        it = make_train_iterator(read_imagpose_json(files["train"].index_json), 64, 64, batch_size=batch_size,
                                 seed=seed)
        return as_batch(next(it))


def build(c, mesh=None, *, drawn: bool = True):
    """(graphdef, state, shardings, TrainStep) for config `c` on `mesh` (default: one device). The weights are drawn in
    NumPy (`testing.drawn_train_state`: no compile of the random init) unless `drawn` is False, which runs
    `init_train_state` itself, as `imagpose train` does."""
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    if drawn:
        graphdef, state, shardings = drawn_train_state(c, mesh)
    else:
        graphdef, state, shardings = init_train_state(tc.state_builder(c), mesh)
    step = tc.train_step(c, graphdef, shardings)
    return graphdef, state, shardings, step
