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

DINO_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, patch_size=14, image_size=518)


def model_sizes(size: str):
    """(IMAGPoseConfig, diffusers AutoencoderKL kwargs, transformers Dinov2Config kwargs) for "tiny" (the tiny models
    of `imagpose_jax.testing`) or "sd15"."""
    from convert_weights.single_file import SD15_VAE_CONFIG
    from imagpose_jax import testing
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    if size == "tiny":
        return testing.tiny_model_config(), dict(testing.TINY_VAE), testing.TINY_DINO
    return IMAGPoseConfig(), {k: v for k, v in SD15_VAE_CONFIG.items() if not k.startswith("_")}, DINO_BASE


def write_random_checkpoints(out: str, size: str = "tiny", seed: int = 0, init: str = "model") -> None:
    import torch
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from convert_weights.imagpose import export_imagpose
    from imagpose_jax.checkpoint.folder import PipelineFolder
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import ParamKeys, abstract

    cfg, vae_kwargs, dino_kwargs = model_sizes(size)
    if init == "normal":
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                              nnx.state(abstract(lambda k: IMAGPose(cfg, rngs=k)), nnx.Param))
    else:
        params = nnx.state(IMAGPose(cfg, rngs=ParamKeys(seed)), nnx.Param)
    export_imagpose(params, cfg, out, step=0)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    torch.manual_seed(seed)
    folder = PipelineFolder(out)  # the source models in the inference folder's names
    AutoencoderKL(**vae_kwargs).save_pretrained(folder.vae)
    Dinov2Model(Dinov2Config(**dino_kwargs)).save_pretrained(folder.image_encoder)


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
