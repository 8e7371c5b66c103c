"""A VAE with another downscale factor than SD's 8 (the demo's three-block VAE downscales by 4): the known-slot
flag is built at the latents' size, the pose guider must downscale as much (a clear error otherwise), and the
train step and the sampler run at the latents' size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagpose_jax.models.imagpose import IMAGPose
from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
from imagpose_jax.train import config as tc
from imagpose_jax.testing import drawn_modules, random_batch
from train_fixtures import demo_config, build, tiny_batch, tiny_config


STEPS = 20


def factor4_config(stage: int = 3):
    c = tiny_config(stage)
    c.vae = demo_config().vae.to_dict()
    c.pose_guider_channels = demo_config().pose_guider_channels
    return c


def test_downscale_factor():
    assert VAEConfig().downscale_factor == 8
    assert VAEConfig.from_dict(demo_config().vae.to_dict()).downscale_factor == 4


def test_pose_guider_factor_mismatch_is_an_error():
    c = tiny_config(3)                                   # pose guider downscales by 8
    model, = drawn_modules(lambda k: IMAGPose(tc.model_config(c), rngs=k))
    with pytest.raises(ValueError, match="pose guider downscales by 8"):
        jax.eval_shape(lambda p: model.pose_features(p, (32, 32)), jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))
    c.vae = demo_config().vae.to_dict()                            # a factor-4 VAE with the factor-8 pose guider
    with pytest.raises(ValueError, match="VAE downscales by 4 but the pose guider by 8"):
        tc.state_builder(c)


def test_train_step_at_factor_4_overfits_one_batch():
    """Latents, flag and pose features line up at 2H/4 (a mismatch would raise), and the step learns: the loss
    on one fixed batch falls. Stage 1 (the UNet and the pose guider train; no CVA): of the stages' steps the
    quickest to compile (54 s here against stage 3's 70), and the loss falls as far (last 5 / first 5: 0.52)."""
    c = factor4_config(1)
    c.optim.learning_rate = 1e-3
    _, state, _, step = build(c)
    batch = tiny_batch()
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert step.traces == 1
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"factor-4 step, one batch: first 5 mean {first:.4f}, last 5 mean {last:.4f}")
    assert np.all(np.isfinite(losses)) and last < 0.7 * first


def test_sampler_latent_shape_follows_the_vae():
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    c = factor4_config()
    models = drawn_modules(lambda k: IMAGPose(tc.model_config(c), rngs=k),
                           lambda k: AutoencoderKL(VAEConfig.from_dict(c.vae), rngs=k),
                           lambda k: Dinov2Model(Dinov2Config.from_dict(c.dino.to_dict()), rngs=k))
    sampler = Sampler(*models, SamplerConfig(num_inference_steps=1))
    assert sampler.latent_shape(128, 128) == (32, 32, 4)
    with pytest.raises(ValueError, match="not a multiple of the VAE's downscale factor 4"):
        sampler.latent_shape(130, 128)
    batch = random_batch(1, 64, 64)
    out = sampler(batch, noise=np.zeros((1, 32, 32, 4), np.float32))
    assert out.shape == (1, 128, 128, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match=r"expected \(1, 32, 32, 4\)"):
        sampler(batch, noise=np.zeros((1, 16, 16, 4), np.float32))
