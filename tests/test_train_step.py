"""The jitted train step on tiny stage-2 models: only CVA parameters train and have Adam moments, the rest
(UNet, pose guider, patch, VAE, DINOv2) stay bit-identical; one compilation across steps; the loss falls
when overfitting one fixed batch; the EMA follows the trainable parameters only."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from imagpose_jax.train.stages import CVA
from train_fixtures import build, tiny_batch, tiny_config


STEPS = 30


def flat(state) -> dict:
    return {".".join(map(str, p)): np.array(v.get_value()) for p, v in nnx.to_flat_state(state)
            if not jax.dtypes.issubdtype(v.get_value().dtype, jax.dtypes.prng_key)}


@pytest.fixture(scope="module")
def run():
    """Builds a stage-2 state (lr 1e-3 to overfit quickly, EMA on) and trains STEPS steps on one batch."""
    c = tiny_config(2)
    c.optim.learning_rate = 1e-3
    c.ema = True
    graphdef, state, _, step = build(c)
    before = flat(state)
    batch = tiny_batch()
    losses, trajectory = [], []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        trajectory.append({k: v for k, v in flat(state).items() if k.startswith("model.") and "motion_modules" in k})
        if len(losses) == 1:
            after1 = flat(state)
    return before, after1, trajectory, losses, step, nnx.merge(graphdef, state)


def test_only_cva_params_have_optimizer_state(run):
    ts = run[5]
    moments = [p for p, _ in nnx.to_flat_state(nnx.state(ts.optimizer.opt_state))
               if "mu" in p or "nu" in p]
    trainable = {p for p, _ in nnx.to_flat_state(nnx.state(ts.model, nnx.All(nnx.Param, CVA)))}
    assert moments and {p[p.index("mu" if "mu" in p else "nu") + 1:] for p in moments} == trainable
    n_params = len(nnx.to_flat_state(nnx.state(ts.model, nnx.Param)))
    assert len(moments) == 2 * len(trainable) < 2 * n_params
    ema = {p for p, _ in nnx.to_flat_state(ts.ema)}
    assert ema == trainable


def test_frozen_unchanged_and_trainable_changed(run):
    before, after1, _, _, _, _ = run
    frozen = [k for k in before if k.startswith(("model.", "vae.", "dino.")) and "motion_modules" not in k]
    trained = [k for k in before if k.startswith("model.") and "motion_modules" in k]
    assert frozen and trained
    for k in frozen:
        np.testing.assert_array_equal(after1[k], before[k], err_msg=k)
    changed = [k for k in trained if not np.array_equal(after1[k], before[k])]
    # After one step every CVA parameter moves, except those whose gradient is zero at the zero-initialised proj_out.
    assert any(".proj_out." in k for k in changed)
    print(f"step 1: {len(changed)}/{len(trained)} CVA tensors changed, {len(frozen)} frozen tensors identical")


def test_compiles_once_and_overfits(run):
    _, _, _, losses, step, _ = run
    assert step.traces == 1
    first, final = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"loss over {STEPS} steps on one batch: first 10 mean {first:.4f}, last 10 mean {final:.4f}")
    print("losses", np.round(losses, 4).tolist())
    assert final < 0.7 * first


def test_ema_tracks_params(run):
    before, _, trajectory, _, _, ts = run
    for path, e in nnx.to_flat_state(ts.ema):
        k = "model." + ".".join(map(str, path))
        expected = before[k].astype(np.float64)
        for params in trajectory:  # ema <- d ema + (1 - d) params, after each update
            expected = 0.9999 * expected + (1 - 0.9999) * params[k]
        np.testing.assert_allclose(np.asarray(e.get_value()), expected, rtol=1e-5, atol=1e-7, err_msg=k)


def test_learning_rate_is_an_input_of_the_program(run):
    """A train step of an equal config at another `optim.learning_rate` runs the same compiled program (no trace),
    and the rate is its input, not a constant in it: from the same state and batch the parameter updates scale by the
    ratio of the rates (Adam's update is -lr times a direction independent of lr). A config that changes the program
    (a dropout probability) gets its own."""
    from imagpose_jax.sharding import make_mesh, state_shardings
    from imagpose_jax.train import config as tc
    *_, step, ts = run
    graphdef, state = nnx.split(ts)
    shardings = state_shardings(state, make_mesh(devices=jax.devices()[:1]))
    c = tiny_config(2)
    c.ema, c.optim.learning_rate = True, 1e6
    other = tc.train_step(c, graphdef, shardings)
    batch = tiny_batch()
    copy = lambda: jax.tree.map(lambda x: x.copy(), state)   # noqa: E731 - the steps donate their state
    new = [flat(s) for s, _ in (step(copy(), batch), other(copy(), batch))]
    assert step.traces == other.traces == 1
    old = flat(state)
    k = next(k for k in old if k.startswith("model.") and "motion_modules" in k and "proj_in.kernel" in k)
    small, large = new[0][k] - old[k], new[1][k] - old[k]
    assert np.abs(small).max() > 0
    np.testing.assert_allclose(large, 1e9 * small, rtol=1e-3, atol=1e-3 * 1e9 * np.abs(small).max())
    c.step.p_image = 0.3
    assert tc.train_step(c, graphdef, shardings).traces == 0
