"""The 2x2 grid: tiling, flags and the original's scenario layouts."""
import numpy as np
import pytest

from imagpose_jax.data.grid import compose, plan_layouts, tile, untile
from imagpose_jax.models.imagpose import slot_mask


def test_tile_is_row_major_and_untile_inverts_it():
    views = np.random.default_rng(0).random((2, 4, 8, 6, 3))
    grid = tile(views)
    assert grid.shape == (2, 16, 12, 3)
    assert np.array_equal(grid[:, :8, :6], views[:, 0]) and np.array_equal(grid[:, :8, 6:], views[:, 1])
    assert np.array_equal(grid[:, 8:, :6], views[:, 2]) and np.array_equal(grid[:, 8:, 6:], views[:, 3])
    assert np.array_equal(untile(grid), views)


def test_slot_mask_marks_known_quadrants_at_any_size():
    f = np.asarray(slot_mask(np.array([[True, False, False, True], [False, True, True, False]]), 32, 16))
    assert f.shape == (2, 32, 16, 1) and set(np.unique(f)) == {0.0, 1.0}
    assert f[0, :16, :8].min() == 1 and f[0, :16, 8:].max() == 0 and f[0, 16:, :8].max() == 0 and f[0, 16:, 8:].min() == 1
    np.testing.assert_array_equal(f[1], 1 - f[0])
    np.testing.assert_array_equal(untile(f[0])[:, 0, 0, 0], [1, 0, 0, 1])   # the slot order of `tile`
    with pytest.raises(ValueError, match="even"):
        slot_mask(np.ones((1, 4), bool), 15, 16)


def test_scenario_layouts():
    s = ("source", 0)
    assert [l.slots for l in plan_layouts(1, 1)] == [(s, s, s, ("target", 0))]                       # scenario 1
    two = plan_layouts(1, 4)                                                                          # scenario 2
    assert two[0].slots == (s, ("target", 0), ("target", 1), ("target", 2))
    assert two[1].slots == (s, ("target", 3), s, s) and two[1].known == (True, False, True, True)
    assert [l.slots for l in plan_layouts(3, 2)] == [(s, ("source", 1), ("source", 2), ("target", j)) for j in (0, 1)]
    assert plan_layouts(2, 1)[0].slots == (s, ("source", 1), s, ("target", 0))                       # scenario 3
    with pytest.raises(ValueError, match="at most 3 source"):
        plan_layouts(4, 1)
    with pytest.raises(ValueError, match="at least one source"):
        plan_layouts(0, 1)


def test_compose_blacks_out_unknown_slots():
    h = w = 64
    src = [np.full((h, w, 3), 0.5, np.float32)]
    poses = [np.full((h, w, 3), 0.25, np.float32)]
    tgt = [np.full((h, w, 3), 0.75, np.float32)]
    views, pose_views = compose(plan_layouts(1, 1)[0], src, poses, tgt)
    assert views.shape == pose_views.shape == (4, h, w, 3)
    assert (views[:3] == 0.5).all() and (views[3] == -1).all()
    assert (pose_views[:3] == 0.25).all() and (pose_views[3] == 0.75).all()


def test_view_multiple_is_sd15_unets():
    """VIEW_MULTIPLE (the data pipeline's check) is the SD1.5 UNet's own: three halvings, quadrants for the CVA,
    8 pixels per latent."""
    from imagpose_jax.data.grid import VIEW_MULTIPLE, view_multiple
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.unet import UNet
    from imagpose_jax.models.unet_config import UNetConfig
    from imagpose_jax.models.vae import VAEConfig
    unet = abstract(lambda k: UNet(UNetConfig(use_cva=True), rngs=k))
    assert view_multiple(unet.grid_multiple, VAEConfig().downscale_factor) == VIEW_MULTIPLE == 64
