"""Writing what a person looks at: images in [0, 1] as 8-bit PNGs, and contact sheets (rows of equal-height
views). The one home of the float -> uint8 rounding used by `imagpose generate`, the demo and the trainer's
sample grids."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] (clipped) -> uint8, rounded to nearest."""
    return (np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """(H, W, 3) float in [0, 1] (or uint8 as it is) -> an 8-bit PNG (or JPEG, by the name's extension)."""
    from PIL import Image
    image = np.asarray(image)
    Image.fromarray(image if image.dtype == np.uint8 else to_uint8(image)).save(os.fspath(path))


def contact_sheet(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Rows of (H, W_i, 3) views in [0, 1], each row concatenated left to right, rows top to bottom -> uint8."""
    if not rows:
        raise ValueError("a contact sheet needs at least one row")
    return to_uint8(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0))
