"""`imagpose_jax.preprocess` against transformers' CLIPImageProcessor and diffusers' VaeImageProcessor."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.preprocess import clip_preprocess, load_image, vae_preprocess

SIZES_WH = [(177, 131), (131, 177), (300, 200), (224, 224), (100, 60)]


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    # The PIL backend is what `CLIPImageProcessor()` is in the original's transformers 4.40.
    return (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)()


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("wh", SIZES_WH)
def test_clip_preprocess_matches_transformers(clip_processor, wh, squash):
    img = random_image(*wh)
    ours = clip_preprocess(img, squash_to_224=squash)
    ref_in = img.resize((224, 224), Image.BICUBIC) if squash else img
    ref = clip_processor(images=ref_in, return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("resample", ["lanczos", "bicubic"])
@pytest.mark.parametrize("wh", SIZES_WH)
def test_vae_preprocess_matches_diffusers(wh, resample):
    from diffusers.image_processor import VaeImageProcessor
    img, (h, w) = random_image(*wh, seed=1), (128, 96)
    ours = vae_preprocess(img, (h, w), resample=resample)
    ref = VaeImageProcessor(resample=resample).preprocess(img, height=h, width=w).numpy()[0].transpose(1, 2, 0)
    assert ours.shape == (h, w, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


def test_array_input_equals_pil_input():
    img = random_image(177, 131)
    arr = np.asarray(img)
    np.testing.assert_array_equal(clip_preprocess(arr), clip_preprocess(img))
    np.testing.assert_array_equal(vae_preprocess(arr, (64, 64)), vae_preprocess(img, (64, 64)))
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(arr.astype(np.float32))


def test_load_image(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (30, 20)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
