"""DDIM against diffusers' DDIMScheduler; forward-process helpers against diffusers' formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from imagpose_jax.schedulers import add_noise, alphas_cumprod, get_velocity, make_scheduler

BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_and_alphas_match_diffusers(schedule, zero_snr, spacing):
    cfg = dict(BASE, beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(30)
    ours = make_scheduler("ddim", cfg, 30)
    assert np.array_equal(ours.timesteps, ref.timesteps.numpy())
    assert np.abs(ours.alphas_cumprod - ref.alphas_cumprod.numpy()).max() < 2e-6


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_steps_match_diffusers(prediction, eta):
    cfg = dict(BASE, beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               prediction_type=prediction)
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(6)
    ours = make_scheduler("ddim", {**cfg, "eta": eta}, 6)
    rng = np.random.default_rng(0)
    x_ref = x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    step = jax.jit(ours.step)
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        key = jax.random.key(i)
        x, _ = step((), jnp.asarray(out), i, jnp.asarray(x), key)
        noise = np.asarray(jax.random.normal(key, out.shape, jnp.float32))
        x_ref = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref), eta=eta,
                         variance_noise=torch.from_numpy(noise) if eta else None).prev_sample.numpy()
        np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-5, atol=1e-5)
        x = np.asarray(x)


def test_forward_process_matches_diffusers():
    cfg = dict(BASE, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    ref = DDIMScheduler(**cfg)
    ac = alphas_cumprod(cfg)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((3, 4, 4, 4)).astype(np.float32), rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(add_noise(ac, x0, noise, t), ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=2e-5)  # float32 cumprod order differs
    np.testing.assert_allclose(get_velocity(ac, x0, noise, t), ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=2e-5)  # float32 cumprod order differs


def test_eta_needs_a_key_and_unknown_settings_are_errors():
    s = make_scheduler("ddim", dict(BASE, eta=0.5), 4)
    with pytest.raises(ValueError, match="PRNG key"):
        s.step((), jnp.zeros((1, 2)), 0, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="unknown DDIM settings"):
        make_scheduler("ddim", {"bogus": 1}, 4)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler", {}, 4)
