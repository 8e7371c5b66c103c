"""The IMAGPose denoiser: UNet (+ CVA), pose guider and patch embedding, owning its conditioning.

One path through the model, for training, sampling and the golden parity tests alike:
  cond = model.condition(image_embeds, ref_latents, masked_latents, pose_grid, known=known)   # a `Condition`
  out  = model.denoise(x_t, t, cond)                                                          # (B, h, w, 4)
The known-slot flag is built inside the program from the four known-slot booleans, at the latents' size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

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

    @property
    def latent_channels(self) -> int:
        """The VAE latents' channels: what the UNet predicts, and what the patch embedding reads."""
        return self.unet.out_channels

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
        if (pc.get("in_chans", unet.out_channels) != unet.out_channels
                or pc.get("embed_dim", unet.cross_attention_dim) != unet.cross_attention_dim):
            raise ValueError(f"patch embedding must map the {unet.out_channels} latent channels to cross_attention_dim "
                             f"{unet.cross_attention_dim}, got {pc}")
        return cls(unet=unet, pose_guider_channels=tuple(pg.get("block_out_channels", cls.pose_guider_channels)),
                   patch_size=pc.get("patch_size", 16))

    def to_dict(self) -> dict:
        return {"unet_config": self.unet.to_dict(),
                "pose_guider_config": {"conditioning_embedding_channels": self.unet.block_out_channels[0],
                                       "block_out_channels": list(self.pose_guider_channels)},
                "patch_config": {"patch_size": self.patch_size, "in_chans": self.latent_channels,
                                 "embed_dim": self.embed_dim}}


def slot_mask(known: jax.Array, height: int, width: int) -> jax.Array:
    """known (B, 4) bool, slots row-major -> (B, height, width, 1) float32: 1 over each known slot's quadrant of a
    2x2 grid of that size, 0 elsewhere. The flag channel at latent size; at pixel size it masks the grid."""
    if height % 2 or width % 2:
        raise ValueError(f"a 2x2 grid needs an even height and width, got {height}x{width}")
    k = jnp.asarray(known).astype(jnp.float32).reshape(-1, 2, 1, 2, 1, 1)                 # (B, 2, 1, 2, 1, 1)
    k = jnp.broadcast_to(k, (k.shape[0], 2, height // 2, 2, width // 2, 1))
    return k.reshape(k.shape[0], height, width, 1)


class Condition(NamedTuple):
    """Everything the denoiser is conditioned on (a pytree; batch axis first on every leaf)."""
    image_tokens: jax.Array   # (B, N, D) DINOv2 tokens
    patch_tokens: jax.Array   # (B, P, D) the reference latents' patch tokens
    pose: jax.Array           # (B, h, w, C0) pose-guider features, added after conv_in
    image: jax.Array          # (B, h, w, 5) [known-slot flag 1 | masked-image latents 4]

    @property
    def context(self) -> jax.Array:
        """The cross-attention context (B, N + P, D): [DINOv2 tokens | patch tokens]."""
        return jnp.concatenate([self.image_tokens, self.patch_tokens.astype(self.image_tokens.dtype)], axis=1)

    def keep(self, image: jax.Array, patch: jax.Array) -> Condition:
        """Classifier-free-guidance dropout: per sample (B,) 1 keeps, 0 zeroes the DINOv2 / the patch tokens
        (the null condition is all-zero tokens, in training and sampling; spec section 8)."""
        def scale(x, k):
            return x * jnp.asarray(k).astype(x.dtype)[:, None, None]
        return self._replace(image_tokens=scale(self.image_tokens, image), patch_tokens=scale(self.patch_tokens, patch))

    def null(self) -> Condition:
        """The unconditional branch of classifier-free guidance: both token sets zero, the image and pose kept."""
        return self._replace(image_tokens=jnp.zeros_like(self.image_tokens),
                             patch_tokens=jnp.zeros_like(self.patch_tokens))


class IMAGPose(nnx.Module):
    def __init__(self, cfg: IMAGPoseConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        self.unet = UNet(cfg.unet, rngs=rngs, dtype=dtype)
        self.pose_guider = PoseGuider(cfg.unet.block_out_channels[0], 3, cfg.pose_guider_channels, rngs=rngs, dtype=dtype)
        self.patch = PatchEmbed(cfg.patch_size, cfg.latent_channels, cfg.embed_dim, rngs=rngs, dtype=dtype)

    def pose_features(self, pose_grid: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
        """pose_grid (B, f h, f w, 3) -> (B, h, w, C0) for latents of size `latent_hw` = (h, w), where f is the
        pose guider's downscale factor (8 with SD's four stages); it must equal the VAE's."""
        f = self.cfg.pose_downscale_factor
        if pose_grid.shape[1:3] != (latent_hw[0] * f, latent_hw[1] * f):
            raise ValueError(f"pose grid {pose_grid.shape[1:3]} does not match latents {tuple(latent_hw)}: the pose "
                             f"guider downscales by {f} ({len(self.cfg.pose_guider_channels)} stages); use a pose guider "
                             f"with as many stages as the VAE has blocks")
        return self.pose_guider(pose_grid)

    def condition(self, image_embeds: jax.Array, ref_latents: jax.Array, masked_latents: jax.Array,
                  pose_grid: jax.Array, *, known: jax.Array | None = None, flag: jax.Array | None = None) -> Condition:
        """The denoiser's condition from the encoders' outputs.

        image_embeds (B, N, D) DINOv2 tokens; ref_latents (B, hr, wr, 4) the reference's scaled VAE latents;
        masked_latents (B, h, w, 4) the masked grid's; pose_grid (B, f h, f w, 3) in [0, 1]; `known` (B, 4) bool
        gives the flag (B, h, w, 1). `flag` instead passes one as it is (the golden forward cases use arbitrary
        values to reach every `conv_in` weight); exactly one of the two.
        """
        if (known is None) == (flag is None):
            raise ValueError("give exactly one of `known` (B, 4) and `flag` (B, h, w, 1)")
        b, h, w, _ = masked_latents.shape
        if flag is None:
            flag = slot_mask(known, h, w)
        if flag.shape != (b, h, w, 1):
            raise ValueError(f"flag has shape {flag.shape}; expected {(b, h, w, 1)} for masked latents {masked_latents.shape}")
        return Condition(image_tokens=image_embeds, patch_tokens=self.patch(ref_latents),
                         pose=self.pose_features(pose_grid, (h, w)),
                         image=jnp.concatenate([flag.astype(masked_latents.dtype), masked_latents], axis=-1))

    def denoise(self, x_t: jax.Array, t: jax.Array, cond: Condition) -> jax.Array:
        """x_t (B, h, w, 4) noisy latents, t (B,) or scalar int -> the UNet's prediction (B, h, w, 4)."""
        sample = jnp.concatenate([x_t.astype(cond.image.dtype), cond.image], axis=-1)   # (B, h, w, 9)
        return self.unet(sample, t, cond.context, cond.pose)
