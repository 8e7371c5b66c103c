"""The training objective against diffusers' formulas, guidance dropout, stage filters, partition rules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagpose_jax.sharding import make_mesh, spec_for
from imagpose_jax.schedulers.common import add_noise, get_velocity, snr as compute_snr_jax
from imagpose_jax.train.loss import min_snr_weight, sample_noise, weighted_mse
from imagpose_jax.train.stages import check_model_config, trainable_filter
from imagpose_jax.train.step import StepConfig, guidance_keep
from imagpose_jax.train.config import model_config, training_schedule
from train_fixtures import diffusers_alphas_cumprod, tiny_config


torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_schedule_targets_and_weights_match_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          rescale_betas_zero_snr=True, prediction_type="v_prediction")
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 6, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    ac = training_schedule(tiny_config(1))
    np.testing.assert_allclose(ac, diffusers_alphas_cumprod(), rtol=1e-5, atol=1e-8)
    x, n, tj = jnp.asarray(x0).transpose(0, 2, 3, 1), jnp.asarray(noise).transpose(0, 2, 3, 1), jnp.asarray(t)
    noisy, velocity, snr = add_noise(ac, x, n, tj), get_velocity(ac, x, n, tj), compute_snr_jax(ac, tj)
    tx0, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    ref_noisy = sched.add_noise(tx0, tn, tt).numpy().transpose(0, 2, 3, 1)
    ref_velocity = sched.get_velocity(tx0, tn, tt).numpy().transpose(0, 2, 3, 1)
    ref_snr = compute_snr(sched, tt).numpy()
    np.testing.assert_allclose(np.asarray(noisy), ref_noisy, rtol=1e-5, atol=2e-5)  # float32 schedules
    np.testing.assert_allclose(np.asarray(velocity), ref_velocity, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(snr), ref_snr, rtol=5e-4, atol=1e-8)  # 1 - a cancels at t = 0
    assert float(snr[-1]) == 0.0  # zero terminal SNR

    # The original's v-prediction min-SNR weight: snr += 1; min(snr, gamma) / snr (spec section 6).
    s = torch.from_numpy(ref_snr) + 1
    ref_w = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0] / s
    w = min_snr_weight(jnp.asarray(ref_snr), 5.0)
    np.testing.assert_allclose(np.asarray(w), ref_w.numpy(), rtol=1e-6)
    print("t", t.tolist(), "SNR", np.round(ref_snr, 4).tolist(), "weight", np.round(np.asarray(w), 4).tolist())

    pred = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
    per = torch.nn.functional.mse_loss(torch.from_numpy(pred), torch.from_numpy(np.array(velocity)), reduction="none")
    ref_loss = (per.mean(dim=(1, 2, 3)) * ref_w).mean()
    np.testing.assert_allclose(float(weighted_mse(jnp.asarray(pred), velocity, w)), float(ref_loss), rtol=1e-5)


def test_noise_offset_is_per_sample_and_channel():
    noise = np.asarray(sample_noise(jax.random.key(0), (512, 16, 16, 4), 0.05))
    channel_means = noise.mean(axis=(1, 2))             # (B, C): the offset plus N(0, 1/256) sampling noise
    np.testing.assert_allclose(channel_means.var(), 0.05 ** 2 + 1 / 256, rtol=0.15)
    np.testing.assert_allclose(noise.var(), 1 + 0.05 ** 2, rtol=0.02)


@pytest.mark.parametrize("p", [(0.1, 0.0, 0.0), (0.05, 0.05, 0.05)])
def test_guidance_dropout_frequencies(p):
    cfg = StepConfig(p_image=p[0], p_ref=p[1], p_both=p[2])
    img, ref = (np.asarray(k) for k in guidance_keep(jax.random.key(1), 200_000, cfg))   # (B,) each
    assert set(np.unique(img)) <= {0.0, 1.0} and set(np.unique(ref)) <= {0.0, 1.0}
    got = [np.mean((img == 0) & (ref == 1)), np.mean((img == 1) & (ref == 0)), np.mean((img == 0) & (ref == 0))]
    np.testing.assert_allclose(got, p, atol=0.003)


def test_stage_filters_and_model_configs():
    from flax import nnx
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import abstract
    model = abstract(lambda k: IMAGPose(model_config(tiny_config(2)), rngs=k))
    total = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    cva = nnx.to_flat_state(nnx.state(model, trainable_filter(2)))
    assert 0 < len(cva) < total and all("motion_modules" in path for path, _ in cva)
    assert len(nnx.to_flat_state(nnx.state(model, trainable_filter(3)))) == total
    check_model_config(1, model_config(tiny_config(1)))
    with pytest.raises(ValueError, match="use_cva=False"):
        check_model_config(1, model_config(tiny_config(3)))
    with pytest.raises(ValueError, match="stage"):
        trainable_filter(4)


def test_partition_rules():
    mesh = make_mesh(devices=jax.devices()[:1])  # axes of size 1 divide everything
    assert spec_for("model.unet.conv_in.kernel", (3, 3, 9, 320), mesh) == P(None, None, None, "fsdp")
    assert spec_for("optimizer.opt_state.1.0.mu.unet.x.to_q.kernel", (320, 320), mesh) == P("fsdp", None)
    assert spec_for("model.unet.conv_in.bias", (320,), mesh) == P()
    assert spec_for("rng", (), mesh) == P()
    # the frozen encoders replicated (no FSDP gathers of them every step)
    assert spec_for("vae.encoder.conv_in.kernel", (3, 3, 3, 128), mesh) == P()
    assert spec_for("dino.encoder.layer.0.attention.attention.query.kernel", (768, 768), mesh) == P()
