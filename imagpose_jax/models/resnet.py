"""ResNet block and the up/down-sampling layers of diffusers' UNet and VAE (NHWC)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.layers import activation, conv, group_norm, linear


class ResnetBlock2D(nnx.Module):
    """norm1 -> act -> conv1 (+ time projection) -> norm2 -> act -> conv2, plus a (1x1-projected) skip."""

    def __init__(self, cin: int, cout: int | None = None, *, temb_channels: int | None = None, groups: int = 32,
                 eps: float = 1e-6, act_fn: str = "silu", output_scale_factor: float = 1.0,
                 rngs: nnx.Rngs, dtype=None):
        cout = cout or cin
        self.norm1 = group_norm(cin, groups, eps, rngs=rngs, dtype=dtype)
        self.conv1 = conv(cin, cout, 3, padding=1, rngs=rngs, dtype=dtype)
        self.time_emb_proj = linear(temb_channels, cout, rngs=rngs, dtype=dtype) if temb_channels else None
        self.norm2 = group_norm(cout, groups, eps, rngs=rngs, dtype=dtype)
        self.conv2 = conv(cout, cout, 3, padding=1, rngs=rngs, dtype=dtype)
        self.conv_shortcut = conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None
        self.act = activation(act_fn)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x (B, H, W, Cin), temb (B, T) -> (B, H, W, Cout)."""
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv. `padding=0` is the VAE's asymmetric form: pad right/bottom by one first."""

    def __init__(self, c: int, cout: int | None = None, *, padding: int = 1, rngs: nnx.Rngs, dtype=None):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(c, cout or c, 3, stride=2, padding=pad, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, 2H, 2W, C)
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv."""

    def __init__(self, c: int, cout: int | None = None, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv(c, cout or c, 3, padding=1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))
