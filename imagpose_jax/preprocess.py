"""Host-side image pre-processing (numpy + PIL, no jax), reproducing what the original pipeline feeds its models.

- `clip_preprocess`: the DINOv2 input, exactly transformers' `CLIPImageProcessor()` with its defaults
  (PIL bicubic resize of the shortest edge to 224, centre crop 224, x/255 in float64 then float32,
  CLIP mean/std); `squash_to_224=True` first squashes the image to 224x224 as the original inference does.
- `vae_preprocess`: the VAE input, exactly diffusers' `VaeImageProcessor().preprocess` for a PIL image
  (PIL resize, Lanczos by default, x/255 in float32, 2x - 1), but NHWC instead of NCHW.
- `to_rgb`: any PIL image -> 8-bit RGB, the one conversion every image read goes through (`load_image`,
  `as_rgb_image`, the data pipeline): 16-bit images are scaled to 8 bits (PIL's `convert("RGB")` clips them, a
  16-bit photo turning almost all white), and transparent images (RGBA, LA, PA, palette images with a
  transparent colour) are composited over `BACKDROP`, the near-white studio backdrop of DeepFashion and of the
  synthetic data (`data/synthetic.py`), instead of showing whatever colour the transparent pixels hold.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLIP_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
BACKDROP = (240, 240, 240)  # RGB under transparent pixels: near-white, as DeepFashion's and the synthetic backdrops
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit integer pixels, read as 16-bit (PNG, TIFF)
RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode -> 8-bit RGB: 16-bit gray scaled by 255/65535 (rounded), transparency composited
    over `BACKDROP`, everything else (L, 1, P, CMYK, YCbCr, ...) by PIL's own conversion. Always a new,
    loaded image (safe to keep after the file is closed)."""
    if image.mode in _SIXTEEN_BIT:
        x = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((x * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.has_transparency_data:  # an alpha band (RGBA, LA, PA, ...) or a transparent colour (P, L, RGB)
        back = Image.new("RGBA", image.size, BACKDROP + (255,))
        return Image.alpha_composite(back, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file as an RGB PIL image (`to_rgb`); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image (converted by `to_rgb`) or a uint8 (H, W, 3) array -> an RGB PIL image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) image array, got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    return image if image.mode == "RGB" else to_rgb(image)


def clip_preprocess(image: Image.Image | np.ndarray, *, squash_to_224: bool = False) -> np.ndarray:
    """An RGB image -> float32 (224, 224, 3), normalised with CLIP's mean and std (DINOv2's input)."""
    img = as_rgb_image(image)
    if squash_to_224:
        img = img.resize((CLIP_SIZE, CLIP_SIZE), Image.BICUBIC)
    w, h = img.size
    long = int(CLIP_SIZE * max(w, h) / min(w, h))
    img = img.resize((CLIP_SIZE, long) if w <= h else (long, CLIP_SIZE), Image.BICUBIC)
    w, h = img.size
    top, left = (h - CLIP_SIZE) // 2, (w - CLIP_SIZE) // 2
    x = np.asarray(img)[top:top + CLIP_SIZE, left:left + CLIP_SIZE]            # (224, 224, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - CLIP_MEAN) / CLIP_STD


def vae_preprocess(image: Image.Image | np.ndarray, size_hw: tuple[int, int], resample: str = "lanczos") -> np.ndarray:
    """An RGB image -> float32 (H, W, 3) in [-1, 1] at `size_hw` (the VAE's input).

    diffusers rounds H and W down to multiples of 8 before resizing; pass sizes that already are.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(RESAMPLE)}")
    h, w = size_hw
    x = np.asarray(as_rgb_image(image).resize((w, h), RESAMPLE[resample])).astype(np.float32) / 255.0
    return 2.0 * x - 1.0
