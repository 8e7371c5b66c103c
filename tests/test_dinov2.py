"""DINOv2 in NNX against transformers' `Dinov2Model`, and its converter (strict loading, exact export)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from convert_weights.core import ConversionError
from golden import case_dirs
from convert_weights.dinov2 import export_dinov2, load_dinov2
from imagpose_jax.models.dinov2 import Dinov2Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14,
             image_size=224, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True, hidden_act="gelu")
REL_TOL = 1e-5


def save_random_hf(folder: Path, seed: int = 0, **overrides) -> Path:
    """A transformers `Dinov2Model` with every weight random (norms, layer scales and mask token included),
    written by `save_pretrained` (the real on-disk format)."""
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith("weight") and p.ndim == 1 or name.endswith("lambda1")
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_scale else 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def hf_forward(folder: Path, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    model = transformers.Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                    bool_masked_pos=None if mask is None else torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def pixels(h: int, w: int, b: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return save_random_hf(tmp_path_factory.mktemp("dinov2_small"))


@pytest.fixture(scope="module")
def small_518(tmp_path_factory) -> Path:
    """A stored 7x7 position grid, as DINOv2-base stores 37x37: a square 224 px input still interpolates."""
    return save_random_hf(tmp_path_factory.mktemp("dinov2_98"), seed=1, image_size=98)


@pytest.mark.parametrize("hw", [(224, 224), (168, 252), (230, 224)])
def test_parity_with_transformers(small, hw):
    _, model = load_dinov2(small, pos_interpolation="size")
    x = pixels(*hw)
    ours = model(jnp.asarray(x))
    assert ours.shape == (2, 1 + (hw[0] // 14) * (hw[1] // 14), 48)
    assert rel_err(ours, hf_forward(small, x)) <= REL_TOL


def test_parity_interpolated_square(small_518):
    _, model = load_dinov2(small_518, pos_interpolation="size")
    x = pixels(224, 224)
    assert rel_err(model(jnp.asarray(x)), hf_forward(small_518, x)) <= REL_TOL


def legacy_interpolate_pos_encoding(self, embeddings, height, width):
    """transformers 4.40's `Dinov2Embeddings.interpolate_pos_encoding` (the original IMAGPose's)."""
    num_patches, num_positions = embeddings.shape[1] - 1, self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    class_pos_embed, patch_pos_embed = self.position_embeddings[:, 0], self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    height, width = height // self.config.patch_size + 0.1, width // self.config.patch_size + 0.1
    side = int(math.sqrt(num_positions))
    patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale_factor = (float(height / math.sqrt(num_positions)), float(width / math.sqrt(num_positions)))
    patch_pos_embed = torch.nn.functional.interpolate(patch_pos_embed, scale_factor=scale_factor, mode="bicubic",
                                                      align_corners=False)
    assert (int(height), int(width)) == tuple(patch_pos_embed.shape[-2:])
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("which,hw", [("small", (168, 252)), ("small_518", (224, 224)), ("small_518", (182, 126))])
def test_parity_with_legacy_scale_factor_interpolation(request, monkeypatch, which, hw):
    folder = request.getfixturevalue(which)
    monkeypatch.setattr(transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding",
                        legacy_interpolate_pos_encoding)
    cfg, model = load_dinov2(folder)
    assert cfg.pos_interpolation == "scale_factor"
    x = pixels(*hw)
    ref = hf_forward(folder, x)
    assert rel_err(model(jnp.asarray(x)), ref) <= REL_TOL
    # The two interpolations differ, so this test does check the legacy one.
    _, model_size = load_dinov2(folder, pos_interpolation="size")
    assert rel_err(model_size(jnp.asarray(x)), ref) > 1e-3


def test_masked_positions(small):
    _, model = load_dinov2(small, pos_interpolation="size")
    x = pixels(224, 224)
    mask = np.random.default_rng(3).random((2, 256)) < 0.3
    assert rel_err(model(jnp.asarray(x), jnp.asarray(mask)), hf_forward(small, x, mask)) <= REL_TOL


def golden_encoders() -> list[Path]:
    """The `image_encoder` folders of the golden cases (../shared/golden or $IMAGPOSE_GOLDEN_DIR)."""
    weights = {d: json.loads((d / "case.json").read_text()).get("weights", {}) for d in case_dirs()}
    return [d / w["image_encoder"] for d, w in weights.items() if "image_encoder" in w]


@pytest.mark.parametrize("folder", golden_encoders(), ids=lambda p: p.parent.name)
def test_golden_image_encoder(folder):
    """The golden cases' encoders (written by transformers 4.40) at 224 px, where no interpolation happens."""
    _, model = load_dinov2(folder)
    x = pixels(224, 224, b=1)
    assert rel_err(model(jnp.asarray(x)), hf_forward(folder, x)) <= REL_TOL


def test_bfloat16_compute(small):
    _, model = load_dinov2(small, dtype=jnp.bfloat16)
    x = pixels(224, 224)
    out = model(jnp.asarray(x))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, hf_forward(small, x)) <= 5e-2


def test_export_round_trip(small, tmp_path):
    original = load_file(small / "model.safetensors")
    _, model = load_dinov2(small)
    sd = export_dinov2(model, tmp_path / "model.safetensors")
    assert sd.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(sd[k], original[k], err_msg=k)
    shutil.copy(small / "config.json", tmp_path / "config.json")
    x = pixels(224, 224)
    np.testing.assert_array_equal(hf_forward(tmp_path, x), hf_forward(small, x))


def test_pytorch_model_bin(small, tmp_path):
    sd = load_file(small / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    shutil.copy(small / "config.json", tmp_path / "config.json")
    _, model = load_dinov2(tmp_path)
    exported = export_dinov2(model)
    assert all(np.array_equal(exported[k], sd[k]) for k in sd)


def corrupted(small: Path, folder: Path, edit) -> Path:
    sd = load_file(small / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors")
    shutil.copy(small / "config.json", folder / "config.json")
    return folder


def test_renamed_key_is_named(small, tmp_path):
    def rename(sd):
        sd["encoder.layer.1.mlp.fc_1.weight"] = sd.pop("encoder.layer.1.mlp.fc1.weight")
    with pytest.raises(ConversionError) as e:
        load_dinov2(corrupted(small, tmp_path, rename))
    assert "missing" in str(e.value) and "encoder.layer.1.mlp.fc1.weight" in str(e.value)
    assert "unexpected" in str(e.value) and "encoder.layer.1.mlp.fc_1.weight" in str(e.value)


def test_wrong_shape_is_named(small, tmp_path):
    def reshape(sd):
        sd["encoder.layer.0.attention.attention.query.weight"] = np.zeros((48, 40), np.float32)
    key = r"encoder\.layer\.0\.attention\.attention\.query\.weight"
    with pytest.raises(ConversionError, match=r"shape mismatch.*" + key):
        load_dinov2(corrupted(small, tmp_path, reshape))


def test_config_errors(small, tmp_path):
    cfg = json.loads((small / "config.json").read_text())
    with pytest.raises(NotImplementedError, match="swiglu"):
        Dinov2Config.from_dict({**cfg, "use_swiglu_ffn": True})
    with pytest.raises(ValueError, match="pos_interpolation"):
        Dinov2Config.from_dict(cfg, pos_interpolation="nearest")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dinov2(tmp_path)
