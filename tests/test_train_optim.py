"""The optimizer's learning-rate schedules (`train.state.make_tx`): with a constant gradient of 1 and no weight
decay, Adam's update at step t is -lr(t) (to eps), so the updates read the schedule back. The peak rate is the
update's argument (an input of the train step's program), the schedule's shape the optimizer's own."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagpose_jax.train.state import make_tx


def updates(tx, steps: int, lr: float = 1e-3) -> np.ndarray:
    params = {"w": jnp.zeros(())}
    opt = tx.init(params)
    out = []
    for _ in range(steps):
        u, opt = tx.update({"w": jnp.ones(())}, opt, params, learning_rate=np.float32(lr))
        out.append(float(u["w"]))
    return -np.asarray(out)


def test_constant_is_the_learning_rate():
    np.testing.assert_allclose(updates(make_tx(weight_decay=0.0), 5), 1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates(make_tx(weight_decay=0.0), 5, lr=0.5), 0.5, rtol=1e-4)


def test_same_as_optax_adamw():
    """Bit for bit optax's clipped `adamw` at a constant rate behind `apply_if_finite` (what the step ran when the rate
    was a constant), through steps whose gradient holds a NaN or an inf: those are skipped (zero updates, moments and
    counts kept) and the next finite step continues as if they had not been."""
    import optax
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    ours = make_tx(clip_norm=1.0)
    ref = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.01)), 2**31 - 1)
    so, sr = ours.init(params), ref.init(params)
    ours_update = jax.jit(lambda g, s, p: ours.update(g, s, p, learning_rate=np.float32(3e-4)))   # compiled, as in
    ref_update = jax.jit(ref.update)                                                               # the train step
    for i, bad in enumerate((None, np.nan, None, np.inf, -np.inf, None)):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        if bad is not None:
            g["w"][1, 2] = bad
        before = so
        (uo, so), (ur, sr) = ours_update(g, so, params), ref_update(g, sr, params)
        for k in params:
            np.testing.assert_array_equal(np.asarray(uo[k]), np.asarray(ur[k]), err_msg=f"step {i} {k}")
        if bad is not None:
            assert all(not np.asarray(u).any() for u in uo.values()), f"step {i}: a non-finite gradient updated"
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(so), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {i}: the state changed")
        params = optax.apply_updates(params, uo)
    assert int(sr.total_notfinite) == 3


def test_constant_with_warmup_ramps_linearly():
    lr = updates(make_tx(weight_decay=0.0, warmup_steps=4), 7)
    np.testing.assert_allclose(lr, [0.0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3], rtol=1e-4, atol=1e-9)


def test_cosine_decays_to_a_tenth():
    lr = updates(make_tx(weight_decay=0.0, schedule="cosine", warmup_steps=2, total_steps=10), 11)
    np.testing.assert_allclose(lr[:3], [0.0, 0.5e-3, 1e-3], rtol=1e-4, atol=1e-9)
    half = 0.1e-3 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 4 / 8))  # step 6: half-way through the decay
    np.testing.assert_allclose(lr[6], half, rtol=1e-4)
    np.testing.assert_allclose(lr[10], 0.1e-3, rtol=1e-4)
    assert np.all(np.diff(lr[2:]) < 0)


def test_bad_schedules_are_errors():
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        make_tx(schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        make_tx(schedule="cosine", warmup_steps=10, total_steps=10)
