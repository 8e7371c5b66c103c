"""The one batch type that goes from the host to the device, and its one builder.

Training (`data.pipeline`), sampling (`IMAGPosePipeline`), evaluation and the demo all build examples with
`make_example` and stack them with `stack`. NHWC numpy, one 2x2 grid of H x W views per row:

    grid         (B, 2H, 2W, 3) float32 in [-1, 1]  every slot's view: the training targets in the unknown slots;
                                                    at sampling the unknown slots are ignored (masked in the program)
    known        (B, 4) bool                        which slots are given, row-major
    pose_grid    (B, 2H, 2W, 3) float32 in [0, 1]   every slot's pose rendering
    ref_pixels   (B, Hr, Wr, 3) float32 in [-1, 1]  the reference for the patch tokens (one view, or the grid size)
    dino_pixels  (B, 224, 224, 3) float32           the reference after CLIP's pre-processing (DINOv2's input)

The masked grid and the known-slot flag are derived inside the compiled program from `grid` and `known`
(`models.imagpose.slot_mask`); CLIP's pre-processing runs here, in the data workers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from imagpose_jax.data.grid import NUM_SLOTS, tile, untile
from imagpose_jax.preprocess import clip_preprocess, vae_preprocess


class Batch(NamedTuple):
    grid: np.ndarray
    known: np.ndarray
    pose_grid: np.ndarray
    ref_pixels: np.ndarray
    dino_pixels: np.ndarray


def as_batch(batch) -> Batch:
    """A `Batch`, or a mapping with its fields (e.g. after `sharding.host_batch_to_global`) -> a `Batch`."""
    if isinstance(batch, Batch):
        return batch
    missing = [f for f in Batch._fields if f not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing} (a Batch has {list(Batch._fields)}; got {sorted(batch)})")
    return Batch(**{f: batch[f] for f in Batch._fields})


def batch_spec(batch_size: int, height: int, width: int, *, ref_size: tuple[int, int] | None = None,
               sharding=None) -> Batch:
    """The shapes and dtypes of a `Batch` of `batch_size` grids of height x width views (the reference at `ref_size`,
    default one view), as `jax.ShapeDtypeStruct`s with `sharding` (e.g. `sharding.batch_sharding(mesh)`)."""
    import jax
    from imagpose_jax.preprocess import CLIP_SIZE
    rh, rw = ref_size or (height, width)
    shapes = {"grid": ((2 * height, 2 * width, 3), np.float32), "known": ((NUM_SLOTS,), np.bool_),
              "pose_grid": ((2 * height, 2 * width, 3), np.float32), "ref_pixels": ((rh, rw, 3), np.float32),
              "dino_pixels": ((CLIP_SIZE, CLIP_SIZE, 3), np.float32)}
    return Batch(**{f: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
                    for f, (shape, dtype) in shapes.items()})


def to_signed(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1], with `preprocess.vae_preprocess`'s arithmetic (x / 255, then 2x - 1)."""
    return 2.0 * (np.asarray(images).astype(np.float32) / 255.0) - 1.0


def make_example(views: np.ndarray, poses: np.ndarray, known, reference: Image.Image | np.ndarray, *,
                 ref_size: tuple[int, int] | None = None, dino_squash: bool = False) -> dict[str, np.ndarray]:
    """One grid: views (4, H, W, 3) float32 in [-1, 1] (unknown slots: the targets, or anything at sampling),
    poses (4, H, W, 3) float32 in [0, 1], known (4,) bools (at least one known), the reference image (a uint8
    array or PIL image, at any size). The reference is resized to `ref_size` (H, W) (default: the view size)
    for the patch tokens, and CLIP-pre-processed (after squashing it to 224 x 224 with `dino_squash`)."""
    views, poses = np.asarray(views, np.float32), np.asarray(poses, np.float32)
    known = np.asarray(known, bool)
    if views.ndim != 4 or views.shape[0] != NUM_SLOTS or views.shape[-1] != 3:
        raise ValueError(f"views must be (4, H, W, 3), got {views.shape}")
    if poses.shape != views.shape:
        raise ValueError(f"poses {poses.shape} and views {views.shape} differ in shape")
    if known.shape != (NUM_SLOTS,) or not known.any():
        raise ValueError(f"known must be 4 booleans with at least one True, got {known.tolist()}")
    return {"grid": tile(views), "known": known, "pose_grid": tile(poses),
            "ref_pixels": vae_preprocess(reference, ref_size or views.shape[1:3]),
            "dino_pixels": clip_preprocess(reference, squash_to_224=dino_squash)}


def stack(examples: Sequence[dict[str, np.ndarray]]) -> Batch:
    """Examples of `make_example` -> a `Batch` (a leading batch axis on every field)."""
    if not examples:
        raise ValueError("no examples to stack")
    return Batch(**{f: np.stack([e[f] for e in examples]) for f in Batch._fields})


def masked_views(grid: np.ndarray, known) -> np.ndarray:
    """The masked grid the model sees, on the host (for sheets): (..., 2H, 2W, 3) with -1 in unknown slots."""
    views = untile(np.asarray(grid))
    known = np.asarray(known, bool)[..., :, None, None, None]
    return tile(np.where(known, views, np.float32(-1.0)))
