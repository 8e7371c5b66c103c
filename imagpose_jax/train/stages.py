"""Which parameters train in each stage (spec section 6), as NNX filters over the `IMAGPose` model.

The VAE and DINOv2 are never part of `IMAGPose`, so every stage leaves them frozen.
  1: UNet + pose guider + patch embedding, on a model without CVA;
  2: the CVA modules only (parameters under a `motion_modules` path);
  3: everything in the model (UNet with CVA, pose guider, patch embedding).
"""
from __future__ import annotations

from flax import nnx

from imagpose_jax.models.imagpose import IMAGPoseConfig

STAGES = (1, 2, 3)
CVA = nnx.PathContains("motion_modules")


def trainable_filter(stage: int) -> nnx.filterlib.Filter:
    """The filter selecting the stage's trainable `nnx.Param`s inside an `IMAGPose` model."""
    if stage == 2:
        return nnx.All(nnx.Param, CVA)
    if stage in (1, 3):
        return nnx.Param
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def check_model_config(stage: int, cfg: IMAGPoseConfig) -> None:
    """Stage 1 trains a model without CVA; stages 2 and 3 need the CVA modules."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if cfg.unet.use_cva != (stage != 1):
        raise ValueError(f"stage {stage} needs a UNet with use_cva={stage != 1}, got use_cva={cfg.unet.use_cva}")
