"""DDIM and DPM-Solver++ against diffusers' schedulers; forward-process helpers against diffusers' formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

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


# --- multistep DPM-Solver++ against diffusers' DPMSolverMultistepScheduler -------------------------------------------

DPM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("extra", [{}, {"rescale_betas_zero_snr": True, "final_sigmas_type": "sigma_min"},
                                   {"beta_schedule": "linear", "steps_offset": 0, "lambda_min_clipped": -5.1}])
def test_dpm_timesteps_and_sigmas_match_diffusers(spacing, extra):
    cfg = dict(DPM, timestep_spacing=spacing, **extra)
    for n in (1, 5, 10, 15, 20, 25, 30, 50):
        ref = DPMSolverMultistepScheduler(**cfg)
        ref.set_timesteps(n)
        ours = make_scheduler("dpmsolver++", cfg, n)
        assert np.array_equal(ours.timesteps, ref.timesteps.numpy()), (n, ours.timesteps, ref.timesteps)
        # float32 betas differ from torch's by an ulp here and there: sigma_min = sqrt((1 - a_0) / a_0) feels it most
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=5e-6, atol=3e-6)


def _fake_model(x, t, z, xp):
    """A fixed linear function of the sample and the timestep, standing in for the UNet."""
    return 0.8 * x + 0.3 * xp.cos(t / 300.0) * z


def _dpm_loops(cfg, n, x, z):
    """The final sample of an n-step loop: ours as one jitted fori_loop, and diffusers' `step` loop."""
    ours = make_scheduler("dpmsolver++", cfg, n)
    ts = jnp.asarray(ours.timesteps)

    @jax.jit
    def run(x):
        def body(i, carry):
            x, state = carry
            return ours.step(state, _fake_model(x, ts[i].astype(jnp.float32), z, jnp), i, x)
        return jax.lax.fori_loop(0, len(ours.timesteps), body, (x, ours.init_solver_state(x)))[0]

    ref = DPMSolverMultistepScheduler(**cfg)
    ref.set_timesteps(n)
    xr, zr = torch.from_numpy(x), torch.from_numpy(z)
    for t in ref.timesteps:
        xr = ref.step(_fake_model(xr, t.to(torch.float32), zr, torch), t, xr).prev_sample
    return np.asarray(run(jnp.asarray(x))), xr.numpy()


def _assert_close(ours, ref, msg):
    """float32 parity, the absolute part relative to the sample's scale: with epsilon prediction and zero terminal SNR
    the first x0 = (x - sigma eps) / alpha has alpha = 2**-12, so samples reach ~600 and an ulp there is ~6e-5."""
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=5e-6 * max(1.0, float(np.abs(ref).max())), err_msg=msg)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_dpm_loop_matches_diffusers(order, prediction, zero_snr):
    rng = np.random.default_rng(order)
    x, z = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32) for _ in range(2))
    for spacing in ("trailing", "leading"):
        for n in (5, 10, 25):
            cfg = dict(DPM, solver_order=order, prediction_type=prediction, rescale_betas_zero_snr=zero_snr,
                       timestep_spacing=spacing)
            _assert_close(*_dpm_loops(cfg, n, x, z), f"{spacing}, {n} steps")


@pytest.mark.parametrize("extra", [{"solver_type": "heun"}, {"final_sigmas_type": "sigma_min"},
                                   {"timestep_spacing": "linspace", "solver_order": 3, "lower_order_final": False},
                                   {"euler_at_final": True, "final_sigmas_type": "sigma_min",
                                    "prediction_type": "sample"}])
def test_dpm_options_match_diffusers(extra):
    rng = np.random.default_rng(7)
    x, z = (rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for _ in range(2))
    for n in (5, 20):
        cfg = {**DPM, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
               "prediction_type": "v_prediction", **extra}
        _assert_close(*_dpm_loops(cfg, n, x, z), f"{n} steps")


def test_dpm_unsupported_settings_are_errors():
    make_scheduler("dpmsolver++", dict(DPM, eta=0.0, clip_sample=False, thresholding=False), 10)  # neutral: fine
    for bad in ({"thresholding": True}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}, {"eta": 0.5},
                {"clip_sample": True}, {"algorithm_type": "sde-dpmsolver++"}, {"solver_order": 4},
                {"final_sigmas_type": "sigma_max"}, {"prediction_type": "flow_prediction"}):
        with pytest.raises(NotImplementedError, match="DPM-Solver\\+\\+ does not support"):
            make_scheduler("dpmsolver++", dict(DPM, **bad), 10)
    with pytest.raises(ValueError, match="unknown DPM-Solver"):
        make_scheduler("dpmsolver++", {"set_alpha_to_one": True}, 10)
