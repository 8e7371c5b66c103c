"""Image-level conditioning: the 2x2 view grid, its slots and the scenario layouts (spec section 2).

Slots are row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. Host-side numpy, NHWC.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_SLOTS = 4
# SD1.5's: `view_multiple(UNet.grid_multiple = 16 latents, VAE factor 8)` (tests/test_grid.py checks the tie).
VIEW_MULTIPLE = 64


def view_multiple(grid_multiple: int, vae_factor: int) -> int:
    """A view's pixels must be a multiple of this: the grid (two views a side) is `grid_multiple` latents of
    `vae_factor` pixels."""
    return grid_multiple * vae_factor // 2


def check_view_size(height: int, width: int, multiple: int = VIEW_MULTIPLE) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"view size {height}x{width} is not a multiple of {multiple}: the UNet halves the latent "
                         f"grid once per level and cross-view attention splits each level into quadrants")


def tile(views: np.ndarray) -> np.ndarray:
    """(..., 4, H, W, C) -> (..., 2H, 2W, C)."""
    *lead, n, h, w, c = views.shape
    if n != NUM_SLOTS:
        raise ValueError(f"a grid has {NUM_SLOTS} views, got {n}")
    x = views.reshape(*lead, 2, 2, h, w, c)
    x = np.moveaxis(x, -4, -3)  # (..., 2, h, 2, w, c)
    return x.reshape(*lead, 2 * h, 2 * w, c)


def untile(grid: np.ndarray) -> np.ndarray:
    """(..., 2H, 2W, C) -> (..., 4, H, W, C), the inverse of `tile`."""
    *lead, hh, ww, c = grid.shape
    x = grid.reshape(*lead, 2, hh // 2, 2, ww // 2, c)
    x = np.moveaxis(x, -3, -4)
    return x.reshape(*lead, NUM_SLOTS, hh // 2, ww // 2, c)


@dataclass(frozen=True)
class Layout:
    """One grid: each slot shows a source (`("source", i)`) or generates a target (`("target", j)`)."""
    slots: tuple[tuple[str, int], ...]

    @property
    def known(self) -> tuple[bool, ...]:
        return tuple(kind == SOURCE for kind, _ in self.slots)

    @property
    def num_sources(self) -> int:
        return len({i for kind, i in self.slots if kind == SOURCE})

    def sources(self) -> list[tuple[int, int]]:
        """(slot, source index) of each source, each once (a repeated source counts at its first slot)."""
        return self._first(SOURCE)

    def targets(self) -> list[tuple[int, int]]:
        """(slot, target index) of each generated slot, each target once (a repeated target counts at its first slot)."""
        return self._first(TARGET)

    def _first(self, kind: str) -> list[tuple[int, int]]:
        seen, out = set(), []
        for s, (k, i) in enumerate(self.slots):
            if k == kind and i not in seen:
                seen.add(i)
                out.append((s, i))
        return out


SOURCE, TARGET = "source", "target"
# The original's three inference scenarios (spec sections 1-2), the one definition of their slot layouts:
# 1: one source (repeated in slots 0-2), one target; 2: one source, three targets; 3: three sources, one target.
SCENARIOS = {1: Layout(((SOURCE, 0), (SOURCE, 0), (SOURCE, 0), (TARGET, 0))),
             2: Layout(((SOURCE, 0), (TARGET, 0), (TARGET, 1), (TARGET, 2))),
             3: Layout(((SOURCE, 0), (SOURCE, 1), (SOURCE, 2), (TARGET, 0)))}


def plan_layouts(num_sources: int, num_targets: int) -> list[Layout]:
    """The original's inference layouts, one grid per entry.

    One source: up to three targets per grid beside it (scenario 2; with one target: the source fills slots
    0-2 and the target is slot 3, scenario 1). Several sources (at most 3): slots 0-2 hold them (two sources
    padded with the first again) and slot 3 one target per grid (scenario 3).
    """
    if num_sources < 1:
        raise ValueError("at least one source image is needed")
    if num_sources > 3:
        raise ValueError(f"at most 3 source images fit a grid beside a target, got {num_sources}")
    if num_targets < 1:
        raise ValueError("at least one target pose is needed")
    if num_sources > 1 or num_targets == 1:  # scenarios 1 and 3: one grid per target; two sources pad with the first
        src = SCENARIOS[1 if num_sources == 1 else 3].slots[:3]
        src = src if num_sources != 2 else (src[0], src[1], src[0])
        return [Layout(src + ((TARGET, j),)) for j in range(num_targets)]
    layouts = []   # scenario 2: three targets per grid beside the source
    for start in range(0, num_targets, 3):
        chunk = [(TARGET, start + j) for kind, j in SCENARIOS[2].slots[1:] if start + j < num_targets]
        chunk += [(SOURCE, 0)] * (3 - len(chunk))  # a short last chunk shows the source again
        layouts.append(Layout(((SOURCE, 0),) + tuple(chunk)))
    return layouts


def compose(layout: Layout, sources: list[np.ndarray], source_poses: list[np.ndarray],
            target_poses: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One layout's slots from views of equal size (H, W, 3): images in [-1, 1], poses in [0, 1].

    Returns the views (4, H, W, 3), -1 (black) in unknown slots, and the poses (4, H, W, 3); `layout.known`
    gives the known slots (`data.batch.make_example` takes the three)."""
    h, w, _ = sources[0].shape
    images, poses = [], []
    for kind, i in layout.slots:
        if kind == SOURCE:
            images.append(sources[i])
            poses.append(source_poses[i])
        else:
            images.append(np.full((h, w, 3), -1.0, np.float32))
            poses.append(target_poses[i])
    return np.stack(images).astype(np.float32), np.stack(poses).astype(np.float32)
