"""Single-file SD checkpoints (the original LDM layout: `model.diffusion_model.*`, `first_stage_model.*`, EMA copies,
standalone VAE files) convert to exactly what the diffusers-folder route gives for the same weights; strictly."""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights.core import ConversionError, load_torch_file, save_torch_file
from convert_weights.imagpose import read_diffusers_unet, read_single_file_unet, unet_from_sd15
from convert_weights.single_file import ema_key, ldm_unet
from convert_weights.vae import load_vae
from imagpose_jax.models.unet_config import UNetConfig
from imagpose_jax.testing import TINY_VAE
from train_fixtures import tiny_config

UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=32, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")
TEXT = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49, 32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,)}


# ---- the inverse of diffusers' LDM -> diffusers mapping (fixture code: writes files in the original layout) --------

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str, table=RESNET) -> str:
    head, leaf = rest.split(".", 1)
    return dict(table).get(head, head) + "." + leaf


def ldm_unet_key(k: str, layers: int, has_attn_up: dict[int, bool]) -> str:
    n = layers + 1
    for ours, theirs in UNET_TOP.items():
        if k.startswith(ours + "."):
            return theirs + k[len(ours):]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"input_blocks.{1 + int(m[1]) * n + layers}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", k):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", k):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        return f"output_blocks.{int(m[1]) * n + layers}.{2 if has_attn_up[int(m[1])] else 1}.conv.{m[2]}"
    raise KeyError(k)


def to_ldm_unet(sd: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    has_attn = {i: t.startswith("CrossAttn") for i, t in enumerate(config["up_block_types"])}
    return {"model.diffusion_model." + ldm_unet_key(k, config["layers_per_block"], has_attn): v for k, v in sd.items()}


VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def ldm_vae_key(k: str, n_up: int) -> tuple[str, bool]:
    """-> (LDM key, whether LDM stores it as a 1x1 conv)."""
    for part in ("encoder", "decoder"):
        if k == f"{part}.conv_norm_out.weight" or k == f"{part}.conv_norm_out.bias":
            return k.replace("conv_norm_out", "norm_out"), False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k):
        return f"{m[1]}.mid.attn_1.{dict(VAE_ATTN)[m[2]]}.{m[3]}", m[2] != "group_norm"
    return k, False  # conv_in, conv_out, quant_conv, post_quant_conv: the same names


def to_ldm_vae(sd: dict[str, np.ndarray], config: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        name, conv = ldm_vae_key(k, len(config["up_block_types"]))
        out[prefix + name] = v[:, :, None, None] if conv and v.ndim == 2 else v
    return out


# ---- fixtures ---------------------------------------------------------------------------------------------------

def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights exactly representable in float16 and bfloat16 (so every file dtype holds the same values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            v = (torch.randn(p.shape, generator=g) * 0.2).to(torch.bfloat16).float()
            p.copy_(torch.where(v.abs() < 2 ** -14, torch.zeros_like(v), v))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny UNet and VAE as diffusers folders, their state dicts, and the folder route's params."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    d = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, **UNET)
    vae = AutoencoderKL(**TINY_VAE)
    _randomise(unet, 0)
    _randomise(vae, 1)
    unet.save_pretrained(d / "unet")
    vae.save_pretrained(d / "vae")
    config, unet_sd = read_diffusers_unet(d / "unet")
    cfg = UNetConfig.from_dict({**config, "in_channels": 9})
    return dict(dir=d, unet_config=config, cfg=cfg, unet_sd=unet_sd, unet=unet_from_sd15(cfg, unet_sd),
                vae_sd={k: v.numpy() for k, v in vae.state_dict().items()}, vae=load_vae(d / "vae")[1])


def whole_checkpoint(m, *, ema_scale: float | None = None) -> dict[str, np.ndarray]:
    """A whole SD checkpoint: UNet, VAE, text-encoder and schedule keys; with `ema_scale` also an EMA copy of the
    UNet (LitEma's dot-less names) holding the weights, and non-EMA weights `ema_scale` times them."""
    unet = to_ldm_unet(m["unet_sd"], m["unet_config"])
    sd = {**{k: v * (ema_scale or 1) for k, v in unet.items()}, **to_ldm_vae(m["vae_sd"], TINY_VAE, "first_stage_model."),
          **{k: np.full(s, 0.5, np.float32) for k, s in TEXT.items()},
          **{k: np.linspace(0.1, 0.9, 10, dtype=np.float32) for k in SCHEDULE}}
    if ema_scale is not None:
        sd.update({ema_key(k): v for k, v in unet.items()})
        sd["model_ema.decay"], sd["model_ema.num_updates"] = np.array(0.9999, np.float32), np.array(7, np.int32)
    return sd


def _same(a: nnx.State, b: nnx.State, scale: float = 1.0) -> bool:
    fa, fb = nnx.to_flat_state(a), nnx.to_flat_state(b)
    return [p for p, _ in fa] == [p for p, _ in fb] and all(
        np.array_equal(np.asarray(x.get_value()), scale * np.asarray(y.get_value())) for (_, x), (_, y) in zip(fa, fb))


def _unet(m, path, **kw) -> nnx.State:
    config, sd, origins = read_single_file_unet(path, m["dir"] / "unet", **kw)
    assert config == m["unet_config"]
    return unet_from_sd15(m["cfg"], sd, source=str(path), origins=origins)


def _vae_state(path, **kw) -> nnx.State:
    return nnx.state(load_vae(path, config=TINY_VAE, **kw)[1], nnx.Param)


# ---- tests -------------------------------------------------------------------------------------------------------

def test_fp16_safetensors_checkpoint_equals_the_folder_route(models, tmp_path):
    """`v1-5-pruned-emaonly.safetensors`-style: fp16, no EMA copy; UNet and VAE both from the one file."""
    path = tmp_path / "sd-emaonly.safetensors"
    save_torch_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in whole_checkpoint(models).items()},
                    path)
    assert load_torch_file(path)["model.diffusion_model.out.2.weight"].dtype == np.float16
    assert _same(_unet(models, path), models["unet"])
    assert _same(_vae_state(path), nnx.state(models["vae"], nnx.Param))


def test_ckpt_with_ema_takes_the_ema_weights_unless_told(models, tmp_path, caplog):
    """`v1-5-pruned.ckpt`-style: a Lightning `state_dict` wrapper, EMA copy (`model_ema.*`) and non-EMA weights
    (here 2x the EMA ones): EMA by default, the others with ema=False; a log line says which."""
    path = tmp_path / "sd-pruned.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in whole_checkpoint(models, ema_scale=2.0).items()},
                "global_step": 3}, path)
    with caplog.at_level(logging.INFO, logger="convert_weights"):
        assert _same(_unet(models, path), models["unet"])
        assert "EMA weights (model_ema.*)" in caplog.text
        caplog.clear()
        assert _same(_unet(models, path, ema=False), models["unet"], scale=2.0)
        assert "--no-ema" in caplog.text and "not used" in caplog.text
    assert _same(_vae_state(path), nnx.state(models["vae"], nnx.Param))
    sd = load_torch_file(path)
    gone = ema_key("model.diffusion_model.middle_block.1.proj_in.weight")
    del sd[gone]
    with pytest.raises(ConversionError, match=f"incomplete EMA weights.*{gone}"):
        ldm_unet(sd, models["unet_config"])
    assert ldm_unet(sd, models["unet_config"], ema=False)[0].keys() == models["unet_sd"].keys()


def test_standalone_bf16_vae_file_equals_the_folder_route(models, tmp_path):
    """`vae-ft-mse-840000-ema-pruned`-style: bare encoder./decoder./quant_conv keys, 1x1-conv attention weights
    (and an LDM autoencoder's training-loss weights, a listed skip)."""
    path = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file
    sd = {**to_ldm_vae(models["vae_sd"], TINY_VAE), "loss.logvar": np.zeros((), np.float32)}
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, path)
    assert _same(_vae_state(path), nnx.state(models["vae"], nnx.Param))


def test_truncated_file_names_the_file(models, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_torch_file(whole_checkpoint(models), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"cannot read checkpoint .*cut\.safetensors"):
        read_single_file_unet(path, models["dir"] / "unet")
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in whole_checkpoint(models).items()}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:-4096])
    with pytest.raises(ConversionError, match=r"cannot read checkpoint .*cut\.ckpt"):
        load_vae(ckpt, config=TINY_VAE)


U, V = "model.diffusion_model.", "first_stage_model."


@pytest.mark.parametrize("old, new, named", [
    (U + "time_embed.0.weight", U + "time_embedding.0.weight", None),  # diffusers' mapping drops it
    (U + "input_blocks.1.0.in_layers.0.weight", U + "input_blocks.1.0.in_layer.0.weight", None),  # passed through
    (U + "output_blocks.1.1.conv.bias", U + "output_blocks.1.1.conv.b",  # diffusers' mapping fails on it
     "mapping of the UNet failed: KeyError: 'output_blocks.1.1.conv.bias'"),
    (U + "out.2.weight", U + "out.2.weight", f"(file: {U}out.2.weight): checkpoint has (4, 32, 1, 3)"),  # misshaped
    (V + "encoder.down.1.downsample.conv.bias", V + "encoder.down.1.downsample.conv.b", None),
    (V + "decoder.mid.attn_1.q.weight", V + "decoder.mid.attn_1.query.weight", None),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "conditioner.final_layer_norm.weight", None),
])
def test_a_renamed_key_is_an_error_naming_it(models, tmp_path, old, new, named):
    sd = whole_checkpoint(models)
    sd[new] = np.zeros((4, 32, 1, 3), np.float32) if new == old else sd.pop(old)
    path = tmp_path / "renamed.safetensors"
    save_torch_file(sd, path)
    with pytest.raises(ConversionError) as e:
        if old.startswith(V):
            load_vae(path, config=TINY_VAE)
        else:
            _unet(models, path)
    assert (named or new) in str(e.value) and "renamed.safetensors" in str(e.value), str(e.value)


def test_cli_single_file_and_vae_subcommand(models, tmp_path, monkeypatch):
    """`imagpose-convert sd15 --single-file` gives the folder route's UNet; `--unet-dir` with single-file options
    is refused; `imagpose-convert vae` writes the folder `config.init.vae` reads."""
    from convert_weights import cli
    from imagpose_jax.checkpoint.params import load_params, read_config
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    # The freshly initialised pose guider and patch embedding are not this test's subject (and cost 15 s of
    # XLA compiles on the CPU): the folder then holds the UNet only.
    monkeypatch.setattr(cli, "_init_heads", lambda cfg, seed: {})
    path = tmp_path / "sd.ckpt"
    save_torch_file(whole_checkpoint(models, ema_scale=3.0), path)
    assert cli.main(["sd15", "--single-file", str(path), "--unet-config", str(models["dir"] / "unet" / "config.json"),
                     "--out", str(tmp_path / "a")]) == 0
    assert IMAGPoseConfig.from_case(read_config(tmp_path / "a")).unet == models["cfg"]
    assert _same(load_params(tmp_path / "a", models["unet"], prefix="unet."), models["unet"])
    with pytest.raises(SystemExit):
        cli.main(["sd15", "--unet-dir", "x", "--single-file", str(path), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="for --single-file"):
        cli.main(["sd15", "--unet-dir", str(models["dir"] / "unet"), "--no-ema", "--out", str(tmp_path / "c")])
    assert cli.main(["vae", "--vae", str(path), "--vae-config", str(models["dir"] / "vae"), "--out", str(tmp_path / "v")]) == 0
    vae = nnx.state(models["vae"], nnx.Param)
    assert _same(load_params(tmp_path / "v", vae), vae)


def test_default_configs_are_sd15():
    """The single-file defaults are the SD1.5 the rest of the project assumes (our UNet and VAE defaults)."""
    from convert_weights.single_file import SD15_UNET_CONFIG, SD15_VAE_CONFIG
    from imagpose_jax.models.vae import VAEConfig
    from imagpose_jax.train.config import load_config
    from train_fixtures import ROOT
    full = load_config(f"{ROOT}/configs/stage3.py")
    assert UNetConfig.from_dict({**SD15_UNET_CONFIG, "in_channels": 9}) == UNetConfig()
    assert VAEConfig.from_dict(SD15_VAE_CONFIG) == VAEConfig.from_dict(full.vae.to_dict()) == VAEConfig()


def test_train_init_vae_reads_a_single_file(models, tmp_path):
    """`config.init.vae` = a single file: converted with the run's VAE settings, placed with the state's shardings."""
    from imagpose_jax.train.pretrained import load_pretrained
    path = tmp_path / "vae.safetensors"
    save_torch_file(to_ldm_vae(models["vae_sd"], TINY_VAE), path)
    c = tiny_config(1)
    c.init.vae = str(path)
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(models["vae"], nnx.Param))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = load_pretrained({"vae": zeros}, {"vae": jax.tree.map(lambda _: sharding, zeros)}, c)
    assert _same(state["vae"], nnx.state(models["vae"], nnx.Param))
