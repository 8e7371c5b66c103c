"""The IMAGPose denoiser: UNet (+ CVA), pose guider and patch embedding behind one call."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.patch import PatchEmbed
from imagpose_jax.models.pose_guider import PoseGuider
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig


@dataclass(frozen=True)
class IMAGPoseConfig:
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(use_cva=True))
    pose_guider_channels: tuple[int, ...] = (16, 32, 96, 256)
    patch_size: int = 16

    @property
    def pose_downscale_factor(self) -> int:
        """Pose pixels per latent along each side: one stride-2 stage per channel entry after the first."""
        return 2 ** (len(self.pose_guider_channels) - 1)

    @property
    def embed_dim(self) -> int:
        return self.unet.cross_attention_dim

    def replace(self, **kw) -> IMAGPoseConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_case(cls, case: dict) -> IMAGPoseConfig:
        """From the original's settings: `unet_config`, `pose_guider_config`, `patch_config` (a golden case.json)."""
        unet = UNetConfig.from_dict(case["unet_config"])
        pg = case.get("pose_guider_config", {})
        if pg.get("conditioning_embedding_channels", unet.block_out_channels[0]) != unet.block_out_channels[0]:
            raise ValueError("pose guider output channels must equal the UNet's first block channels")
        pc = case.get("patch_config", {})
        if pc.get("in_chans", 4) != 4 or pc.get("embed_dim", unet.cross_attention_dim) != unet.cross_attention_dim:
            raise ValueError(f"patch embedding must map 4 latent channels to cross_attention_dim "
                             f"{unet.cross_attention_dim}, got {pc}")
        return cls(unet=unet, pose_guider_channels=tuple(pg.get("block_out_channels", cls.pose_guider_channels)),
                   patch_size=pc.get("patch_size", 16))

    def to_dict(self) -> dict:
        return {"unet_config": self.unet.to_dict(),
                "pose_guider_config": {"conditioning_embedding_channels": self.unet.block_out_channels[0],
                                       "block_out_channels": list(self.pose_guider_channels)},
                "patch_config": {"patch_size": self.patch_size, "in_chans": 4, "embed_dim": self.embed_dim}}


class IMAGPose(nnx.Module):
    def __init__(self, cfg: IMAGPoseConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.unet = UNet(cfg.unet, rngs=rngs, dtype=dtype)
        self.pose_guider = PoseGuider(cfg.unet.block_out_channels[0], 3, cfg.pose_guider_channels, rngs=rngs, dtype=dtype)
        self.patch = PatchEmbed(cfg.patch_size, 4, cfg.embed_dim, rngs=rngs, dtype=dtype)

    def context(self, image_embeds: jax.Array, ref_latents: jax.Array) -> jax.Array:
        """DINOv2 tokens (B, N, D) and reference latents (B, hr, wr, 4) -> cross-attention context (B, N + P, D)."""
        return jnp.concatenate([image_embeds, self.patch(ref_latents).astype(image_embeds.dtype)], axis=1)

    def pose_features(self, pose_image: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
        """pose_image (B, f h, f w, 3) -> (B, h, w, C0) for latents of size `latent_hw` = (h, w), where f is the
        pose guider's downscale factor (8 with SD's four stages); it must equal the VAE's."""
        f = self.cfg.pose_downscale_factor
        if pose_image.shape[1:3] != (latent_hw[0] * f, latent_hw[1] * f):
            raise ValueError(f"pose grid {pose_image.shape[1:3]} does not match latents {tuple(latent_hw)}: the pose "
                             f"guider downscales by {f} ({len(self.cfg.pose_guider_channels)} stages); use a pose guider "
                             f"with as many stages as the VAE has blocks")
        return self.pose_guider(pose_image)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, image_embeds: jax.Array, ref_latents: jax.Array,
                 pose_image: jax.Array) -> jax.Array:
        """sample (B, h, w, 9) = [noisy latents 4 | flag 1 | masked latents 4]; pose_image (B, f h, f w, 3) -> (B, h, w, 4)."""
        return self.unet(sample, timesteps, self.context(image_embeds, ref_latents),
                         self.pose_features(pose_image, sample.shape[1:3]))


def flag_at(flag: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """The known-slot flag (B, fh, fw, 1) (the data pipeline's is at 2H/8 x 2W/8), constant over each grid slot,
    at latent size (h, w) by nearest resizing: exact for any VAE downscale factor whose latent grid splits into
    the same 2 x 2 slots."""
    if flag.shape[1:3] == tuple(latent_hw):
        return flag
    return jax.image.resize(flag, (flag.shape[0], *latent_hw, flag.shape[-1]), "nearest")
