"""Random-weight checkpoints in the original on-disk formats, for trying the tools without pretrained weights.

  python -m convert_weights.random_weights --size tiny --out random_ckpt/
writes `denoising_unet-0.pth`, `pose_guider-0.pth`, `patch-0.pth` (the original's layout, via our exporter),
`vae/` (diffusers `AutoencoderKL.save_pretrained`), `image_encoder/` (transformers `Dinov2Model.save_pretrained`)
and `config.json` (the original's model settings), ready for `imagpose-convert pipeline`. `--init normal` fills
the IMAGPose parameters with N(0, 0.02) noise instead of the model's own initialisers (seconds instead of a
minute of eager initialisation; for tests and benchmarks of the tools, not for sampling).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
TINY_DINO = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14, image_size=224)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
DINO_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518)


def tiny_config():
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    from imagpose_jax.models.unet_config import UNetConfig
    unet = UNetConfig(block_out_channels=(32, 32, 64, 64), cross_attention_dim=48, use_cva=True)
    return IMAGPoseConfig(unet=unet, patch_size=8)  # 64-pixel views have 8x8 latents: one patch token each


def write_random_checkpoints(out: str, size: str = "tiny", seed: int = 0, init: str = "model") -> None:
    import torch
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from convert_weights.imagpose import export_imagpose
    from imagpose_jax.checkpoint.folder import PipelineFolder
    from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
    from imagpose_jax.models.init import ParamKeys, abstract_params

    cfg = tiny_config() if size == "tiny" else IMAGPoseConfig()
    if init == "normal":
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                              abstract_params(lambda k: IMAGPose(cfg, rngs=k)))
    else:
        params = nnx.state(IMAGPose(cfg, rngs=ParamKeys(seed)), nnx.Param)
    export_imagpose(params, cfg, out, step=0)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    torch.manual_seed(seed)
    folder = PipelineFolder(out)  # the source models in the inference folder's names
    AutoencoderKL(**(TINY_VAE if size == "tiny" else SD15_VAE)).save_pretrained(folder.vae)
    Dinov2Model(Dinov2Config(**(TINY_DINO if size == "tiny" else DINO_BASE))).save_pretrained(folder.image_encoder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=("model", "normal"), default="model",
                   help="the model's initialisers, or N(0, 0.02) noise for every IMAGPose parameter (fast)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    write_random_checkpoints(a.out, a.size, a.seed, a.init)
    print(f"random {a.size} checkpoints written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
