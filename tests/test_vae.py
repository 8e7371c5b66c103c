"""The VAE against diffusers' AutoencoderKL, from its own on-disk folder; strict conversion; the way back."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_weights.core import ConversionError
from convert_weights.vae import export_vae, load_vae
from golden import golden_dir

TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    m = AutoencoderKL(**TINY).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # norms and all: every weight reaches the output
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("vae")
    m.save_pretrained(d)
    return d, m


@pytest.mark.parametrize("hw", [(64, 64), (64, 128)])
def test_matches_diffusers(vae_dir, hw):
    folder, theirs = vae_dir
    _, ours = load_vae(folder)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        post = theirs.encode(torch.from_numpy(x)).latent_dist
        dec = theirs.decode(post.mean).sample.numpy()
    with jax.default_matmul_precision("highest"):
        mean, logvar = ours.encode(jnp.asarray(x.transpose(0, 2, 3, 1)))
        out = ours.decode(mean)
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
    assert rel(np.asarray(mean).transpose(0, 3, 1, 2), post.mean.numpy()) < 1e-5
    assert np.abs(np.asarray(logvar).transpose(0, 3, 1, 2) - post.logvar.numpy()).max() < 1e-4
    assert rel(np.asarray(out).transpose(0, 3, 1, 2), dec) < 1e-4


def test_golden_vae_folder_loads_and_round_trips():
    folder = golden_dir() / "pipeline_3src_1tgt" / "vae"
    if not folder.is_dir():
        pytest.skip("golden VAE folder not available")
    from safetensors.numpy import load_file
    _, ours = load_vae(folder)
    orig = load_file(folder / "diffusion_pytorch_model.safetensors")
    back = export_vae(ours)
    assert sorted(back) == sorted(orig) and all(np.array_equal(back[k], orig[k]) for k in orig)


def test_corrupted_vae_names_the_key(vae_dir, tmp_path):
    folder, theirs = vae_dir
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    sd["decoder.conv_in.weight"] = torch.zeros(64, 4, 1, 1)
    sd["encoder.mid_block.attentions.0.to_qq.weight"] = sd.pop("encoder.mid_block.attentions.0.to_q.weight")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ConversionError) as e:
        load_vae(tmp_path)
    msg = str(e.value)
    assert "decoder.conv_in.weight: checkpoint has (64, 4, 1, 1)" in msg
    assert "encoder.mid_block.attentions.0.to_q.weight" in msg and "to_qq.weight" in msg


def test_unsupported_config_is_an_error(tmp_path):
    cfg = dict(TINY, down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="down_block_types"):
        load_vae(tmp_path)
