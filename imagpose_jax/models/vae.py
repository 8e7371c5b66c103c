"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) in NNX, NHWC. Parameter names follow diffusers' state dict."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.attention import dot_product_attention
from imagpose_jax.models.layers import activation, conv, group_norm, linear
from imagpose_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

FIXED = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
ACCEPTED = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True, "shift_factor": None,
            "latents_mean": None, "latents_std": None}
IGNORED = {"sample_size", "force_upcast"}


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side: one halving per block but the last (8 for SD's four blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping) -> VAEConfig:
        """From a diffusers `AutoencoderKL` config.json; an unsupported setting is an error naming the key."""
        kw, names = {}, {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k.startswith("_") or k in IGNORED:
                continue
            if k in FIXED:
                if any(t != FIXED[k] for t in v):
                    raise NotImplementedError(f"VAE config {k}={v!r}: only {FIXED[k]} blocks are supported")
            elif k in ACCEPTED:
                if v != ACCEPTED[k]:
                    raise NotImplementedError(f"VAE config {k}={v!r} is not supported (supported: {ACCEPTED[k]!r})")
            elif k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
            else:
                raise NotImplementedError(f"unknown VAE config key {k!r}={v!r}")
        return cls(**kw)


class MidAttention(nnx.Module):
    """diffusers' single-head spatial self-attention of the VAE's mid block: GroupNorm, q/k/v with bias, + input.
    Its kernel is the platform's "auto" choice (`models.attention`): at 512x512 views the latent grid is 128x128,
    16,384 tokens, whose whole float32 logits are 1 GiB per image (splash on a TPU, chunked on the CPU)."""

    def __init__(self, c: int, groups: int, *, rngs, dtype=None):
        self.group_norm = group_norm(c, groups, 1e-6, rngs=rngs, dtype=dtype)
        self.to_q = linear(c, c, rngs=rngs, dtype=dtype)
        self.to_k = linear(c, c, rngs=rngs, dtype=dtype)
        self.to_v = linear(c, c, rngs=rngs, dtype=dtype)
        self.to_out_0 = linear(c, c, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, C)
        b, h, w, c = x.shape
        hs = self.group_norm(x).reshape(b, h * w, 1, c)
        out = dot_product_attention(self.to_q(hs), self.to_k(hs), self.to_v(hs), "auto")  # (B, HW, 1, C)
        return self.to_out_0(out.reshape(b, h, w, c)) + x


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, act_fn: str, *, rngs, dtype=None):
        res = lambda: ResnetBlock2D(c, c, groups=groups, eps=1e-6, act_fn=act_fn, rngs=rngs, dtype=dtype)  # noqa: E731
        self.resnets = nnx.List([res(), res()])
        self.attentions = nnx.List([MidAttention(c, groups, rngs=rngs, dtype=dtype)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, act_fn: str, down: bool, *, rngs, dtype=None):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, eps=1e-6, act_fn=act_fn,
                                               rngs=rngs, dtype=dtype) for i in range(n)])
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, rngs=rngs, dtype=dtype)] if down else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class DecoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, act_fn: str, up: bool, *, rngs, dtype=None):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, eps=1e-6, act_fn=act_fn,
                                               rngs=rngs, dtype=dtype) for i in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs, dtype=dtype)] if up else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None):
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, padding=1, rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List([EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, cfg.act_fn,
                                                  i < n - 1, rngs=rngs, dtype=dtype) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.act_fn, rngs=rngs, dtype=dtype)
        self.conv_norm_out = group_norm(ch[-1], g, 1e-6, rngs=rngs, dtype=dtype)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.act_fn)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None):
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, padding=1, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(ch[0], g, cfg.act_fn, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, cfg.act_fn,
                                                i < n - 1, rngs=rngs, dtype=dtype) for i in range(n)])
        self.conv_norm_out = group_norm(ch[-1], g, 1e-6, rngs=rngs, dtype=dtype)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, padding=1, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.act_fn)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs, dtype=None):
        self.cfg = cfg
        L = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype)
        self.quant_conv = conv(2 * L, 2 * L, 1, rngs=rngs, dtype=dtype)
        self.post_quant_conv = conv(L, L, 1, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, 3) in [-1, 1] -> posterior mean, logvar (B, H/8, W/8, 4)."""
        mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @staticmethod
    def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, 4) -> (B, 8h, 8w, 3), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents: the posterior mean (or a sample when `key` is given) x scaling_factor."""
        mean, logvar = self.encode(x)
        z = mean if key is None else self.sample_posterior(mean, logvar, key)
        return z * self.cfg.scaling_factor

    def decode_latents(self, z: jax.Array) -> jax.Array:
        return self.decode(z / self.cfg.scaling_factor)
