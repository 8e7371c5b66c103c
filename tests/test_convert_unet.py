"""The UNet/IMAGPose converter: real on-disk formats in, strict checks, and the way back."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights.core import ConversionError, load_torch_file, save_torch_file
from convert_weights.imagpose import (export_imagpose, load_imagpose, read_diffusers_unet, unet_from_sd15)
from golden import golden_dir
from imagpose_jax.models.imagpose import IMAGPoseConfig
from imagpose_jax.models.init import abstract
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig

TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=48, attention_head_dim=8,
            norm_num_groups=32, sample_size=32, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def diffusers_unet_dir(tmp_path_factory):
    """A diffusers UNet2DConditionModel (9 input channels, random weights) saved as safetensors."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    m = UNet2DConditionModel(in_channels=9, **TINY).eval()
    _randomise(m)
    d = tmp_path_factory.mktemp("unet9")
    m.save_pretrained(d, safe_serialization=True)
    return d, m


def _ours(cfg: UNetConfig, params) -> UNet:
    model = abstract(lambda k: UNet(cfg, rngs=k))
    nnx.update(model, params)
    return model


# One jitted function for every UNet of this file: the same config and input shapes compile once.
_apply_unet = nnx.jit(lambda m, x, t, c: m(x, t, c))


def _apply(ours: UNet, sample_nchw: np.ndarray, t: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """Our UNet on NCHW inputs (NHWC inside) -> NCHW output."""
    with jax.default_matmul_precision("highest"):
        out = _apply_unet(ours, jnp.asarray(sample_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _run_both(ours: UNet, theirs, sample_nchw: np.ndarray, t: np.ndarray, ctx: np.ndarray):
    with torch.no_grad():
        ref = theirs(torch.from_numpy(sample_nchw), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    return _apply(ours, sample_nchw, t, ctx), ref


def test_stage1_unet_matches_diffusers(diffusers_unet_dir):
    """Our UNet without CVA == diffusers' UNet2DConditionModel, loaded from its own safetensors folder."""
    folder, theirs = diffusers_unet_dir
    config, sd = read_diffusers_unet(folder)
    cfg = UNetConfig.from_dict(config)
    assert not cfg.use_cva and cfg.in_channels == 9
    ours = _ours(cfg, unet_from_sd15(cfg, sd))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 32, 48)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 48)).astype(np.float32)
    out, ref = _run_both(ours, theirs, x, np.array([10, 901]), ctx)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel


def test_sd15_conv_in_expansion_keeps_sd_output(tmp_path):
    """A 4-channel SD UNet becomes a 9-channel one whose 5 new input channels are zero: same output as SD."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    sd_unet = UNet2DConditionModel(in_channels=4, **TINY).eval()
    _randomise(sd_unet, 1)
    sd_unet.save_pretrained(tmp_path, safe_serialization=False)  # the .bin format
    config, sd = read_diffusers_unet(tmp_path)
    cfg = UNetConfig.from_dict({**config, "in_channels": 9})
    params = unet_from_sd15(cfg, sd)
    w = np.asarray(params["conv_in"]["kernel"].get_value())  # (3, 3, 9, C)
    assert np.array_equal(w[:, :, :4], sd["conv_in.weight"].transpose(2, 3, 1, 0)) and not w[:, :, 4:].any()
    rng = np.random.default_rng(1)   # the shapes of test_stage1_unet_matches_diffusers: its program, compiled once
    lat = rng.standard_normal((2, 4, 32, 48)).astype(np.float32)
    extra = rng.standard_normal((2, 5, 32, 48)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 48)).astype(np.float32)
    t = np.array([500, 37])
    with torch.no_grad():
        ref = sd_unet(torch.from_numpy(lat), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    out = _apply(_ours(cfg, params), np.concatenate([lat, extra], 1), t, ctx)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_corrupted_checkpoints_name_the_key(diffusers_unet_dir):
    folder, _ = diffusers_unet_dir
    config, sd = read_diffusers_unet(folder)
    cfg = UNetConfig.from_dict(config)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    renamed = dict(sd)
    renamed[key.replace("to_k", "to_kk")] = renamed.pop(key)
    with pytest.raises(ConversionError) as e:
        unet_from_sd15(cfg, renamed)
    assert key in str(e.value) and key.replace("to_k", "to_kk") in str(e.value)
    assert "missing" in str(e.value) and "unexpected" in str(e.value)
    bad = dict(sd)
    bad["mid_block.resnets.1.conv2.weight"] = np.zeros((64, 64, 1, 3), np.float32)
    with pytest.raises(ConversionError, match=r"mid_block\.resnets\.1\.conv2\.weight: checkpoint has \(64, 64, 1, 3\)"):
        unet_from_sd15(cfg, bad)


# ---- the original's own files (the golden cases double as realistic fixtures) --------------------------------

def _golden_case(name):
    folder = golden_dir() / name
    if not (folder / "case.json").is_file():
        pytest.skip(f"golden case {name} not available in {golden_dir()}")
    return folder, IMAGPoseConfig.from_case(json.loads((folder / "case.json").read_text()))


def _same_state(a, b) -> bool:
    fa, fb = nnx.to_flat_state(a), nnx.to_flat_state(b)
    return [p for p, _ in fa] == [p for p, _ in fb] and all(
        np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())) for (_, x), (_, y) in zip(fa, fb))


@pytest.mark.parametrize("fmt", ["ckpt_state_dict_module", "safetensors", "pth"])
def test_motion_module_files_give_the_cva_model(tmp_path, fmt):
    """SD weights + an AnimateDiff-style motion-module file (any of its wrappers) == the whole CVA UNet."""
    folder, cfg = _golden_case("cva_forward")
    whole = load_torch_file(folder / "denoising_unet.pth")
    mm = {k: v for k, v in whole.items() if ".motion_modules." in k}
    rest = {k: v for k, v in whole.items() if ".motion_modules." not in k}
    if fmt == "ckpt_state_dict_module":
        path = tmp_path / "mm.ckpt"
        torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in mm.items()}, "global_step": 7}, path)
    elif fmt == "safetensors":
        path = tmp_path / "mm.safetensors"
        save_torch_file(mm, path)
    else:
        path = tmp_path / "mm.pth"
        save_torch_file(mm, path)
    got = unet_from_sd15(cfg.unet, rest, load_torch_file(path))
    want = load_imagpose(cfg, folder / "denoising_unet.pth", folder / "pose_guider.pth", folder / "patch.pth")["unet"]
    assert _same_state(got, want)
    with pytest.raises(ConversionError, match="needs a motion-module checkpoint"):
        unet_from_sd15(cfg.unet, rest)


def test_export_round_trip_is_identity(tmp_path):
    """ours -> the original's .pth files reproduces the original's state dicts: same keys, dtypes and values
    (keys come out sorted, not in PyTorch's registration order, which loading by name ignores); the `pe`
    buffers, recomputed, within one float32 ulp."""
    for case in ("cva_forward", "stage1_forward"):
        folder, cfg = _golden_case(case)
        params = load_imagpose(cfg, folder / "denoising_unet.pth", folder / "pose_guider.pth", folder / "patch.pth")
        paths = export_imagpose(params, cfg, tmp_path / case, step=3)
        assert os.path.basename(paths["unet"]) == "denoising_unet-3.pth"
        for name, fname in (("unet", "denoising_unet.pth"), ("pose_guider", "pose_guider.pth"), ("patch", "patch.pth")):
            orig = torch.load(folder / fname, map_location="cpu", weights_only=True)
            back = torch.load(paths[name], map_location="cpu", weights_only=True)
            assert sorted(back) == sorted(orig), f"{name}: keys differ"
            for k in orig:
                assert back[k].dtype == orig[k].dtype, k
                if k.endswith("pos_encoder.pe"):
                    # The fixed sinusoidal table is recomputed with torch's float32 sin/cos, whose vector code
                    # differs by one ulp between CPUs (seen: 85 of 2048 entries at dim 64, |diff| 9.5e-7).
                    torch.testing.assert_close(back[k], orig[k], rtol=0, atol=2e-6, msg=k)
                else:
                    assert torch.equal(back[k], orig[k]), k


def test_non_standard_position_table_is_rejected():
    folder, cfg = _golden_case("cva_forward")
    sd = load_torch_file(folder / "denoising_unet.pth")
    key = next(k for k in sd if k.endswith("pos_encoder.pe"))
    sd[key] = sd[key] + 0.5
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        load_imagpose(cfg, sd, folder / "pose_guider.pth", folder / "patch.pth")


def test_unknown_config_settings_are_errors():
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        UNetConfig.from_dict({"class_embed_type": "timestep"})
    with pytest.raises(NotImplementedError, match="bogus"):
        UNetConfig.from_dict({"bogus": 1})
    cfg = UNetConfig.from_dict({"attention_head_dim": 8, "use_motion_module": True, "_class_name": "x"})
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "denoising_unet-1.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read checkpoint .*denoising_unet-1.pth"):
        load_torch_file(bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_torch_file(tmp_path / "nope.pth")


def test_add_cva_gives_the_stage2_initialisation(tmp_path):
    """`imagpose-convert add-cva`: a stage-1 parameter folder + a motion-module file == the whole CVA model;
    a folder that already has CVA is refused."""
    from convert_weights.cli import main as convert_main
    from imagpose_jax.checkpoint import save_params
    from imagpose_jax.checkpoint.params import load_params
    from imagpose_jax.models.imagpose import IMAGPose
    folder, cfg = _golden_case("cva_forward")
    whole = load_imagpose(cfg, folder / "denoising_unet.pth", folder / "pose_guider.pth", folder / "patch.pth")
    sd = load_torch_file(folder / "denoising_unet.pth")
    save_torch_file({k: v for k, v in sd.items() if ".motion_modules." in k}, tmp_path / "mm.safetensors")
    stage1 = cfg.replace(unet=cfg.unet.replace(use_cva=False))
    unet1 = unet_from_sd15(stage1.unet, {k: v for k, v in sd.items() if ".motion_modules." not in k})
    save_params(tmp_path / "stage1", stage1.to_dict(),
                nnx.State({"unet": unet1, "pose_guider": whole["pose_guider"], "patch": whole["patch"]}))
    assert convert_main(["add-cva", "--params", str(tmp_path / "stage1"), "--motion-module",
                         str(tmp_path / "mm.safetensors"), "--out", str(tmp_path / "stage2")]) == 0
    got = load_params(tmp_path / "stage2", nnx.state(abstract(lambda k: IMAGPose(cfg, rngs=k)), nnx.Param))
    assert _same_state(got, whole)
    with pytest.raises(SystemExit, match="already has CVA"):
        convert_main(["add-cva", "--params", str(tmp_path / "stage2"), "--motion-module",
                      str(tmp_path / "mm.safetensors"), "--out", str(tmp_path / "again")])
