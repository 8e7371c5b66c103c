"""Shared fixtures for tests and benchmarks (in the manner of gemma's `gm.testing`): random host batches of the
right shapes and ranges. Nothing here is used by training or sampling."""
from __future__ import annotations

import numpy as np

from imagpose_jax.data.batch import Batch


def random_batch(n: int, height: int, width: int, *, ref_size: tuple[int, int] | None = None,
                 known=(True, True, False, False), seed: int = 0) -> Batch:
    """A `Batch` of n grids of height x width views, random values in each field's range; `known` for every
    grid (default: the top two slots); the reference at `ref_size` (default: one view)."""
    rng = np.random.default_rng(seed)
    gh, gw = 2 * height, 2 * width
    rh, rw = ref_size or (height, width)
    return Batch(grid=rng.uniform(-1, 1, (n, gh, gw, 3)).astype(np.float32),
                 known=np.broadcast_to(np.asarray(known, bool), (n, 4)).copy(),
                 pose_grid=rng.uniform(0, 1, (n, gh, gw, 3)).astype(np.float32),
                 ref_pixels=rng.uniform(-1, 1, (n, rh, rw, 3)).astype(np.float32),
                 dino_pixels=rng.standard_normal((n, 224, 224, 3)).astype(np.float32))
