"""The demo's VAE pre-training (`train.vae.train_vae`): the posterior starts narrow, crops train the same
convolutional VAE, the fitted scaling factor makes the latents unit-variance, and bad sizes are errors."""
from __future__ import annotations

import numpy as np
import pytest

from imagpose_jax.train.vae import reconstruct, train_vae
from train_fixtures import demo_config


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = np.repeat(np.repeat(rng.uniform(-1, 1, (6, 8, 8, 3)), 8, 1), 8, 2)  # 64x64 images of flat 8x8 blocks
    return x.astype(np.float32)


def test_narrow_posterior_crops_and_scaling(images):
    """Trained as the demo trains it (its crop and learning rate; batch 4, as tests/test_demo.py's toy run): the
    same compiled programs, for both runs here and the demo's test."""
    d = demo_config().demo
    run = dict(batch_size=4, crop=d.vae_crop, learning_rate=d.vae_lr)
    vae, cfg, summary = train_vae(images, demo_config().vae.to_dict(), steps=3, initial_logvar=-6.0, **run)
    assert d.vae_crop == 32 and summary["steps"] == 3
    assert summary["posterior_noise_std"] < 0.1            # exp(-6 / 2) = 0.05 at the start
    assert cfg["scaling_factor"] == pytest.approx(1 / summary["latent_std"])
    assert vae.cfg.scaling_factor == cfg["scaling_factor"]
    assert reconstruct(vae, images).shape == images.shape  # trained on 32x32 crops, runs on 64x64 views
    _, _, wide = train_vae(images, demo_config().vae.to_dict(), steps=1, initial_logvar=0.0, **run)
    assert wide["posterior_noise_std"] > 0.5


def test_bad_sizes_are_errors(images):
    with pytest.raises(ValueError, match="larger than the images"):
        train_vae(images, demo_config().vae.to_dict(), steps=1, crop=128)
    with pytest.raises(ValueError, match="multiples of 8"):
        train_vae(images, demo_config().vae.to_dict(), steps=1, crop=36)
