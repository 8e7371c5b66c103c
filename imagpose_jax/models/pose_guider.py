"""The pose guider: pose grid (pixels, RGB in [0, 1]) -> features at latent resolution, added after `conv_in`."""
from __future__ import annotations

import jax
from flax import nnx

from imagpose_jax.models.layers import conv


class PoseGuider(nnx.Module):
    """conv_in 3->c0, SiLU; per stage (c->c 3x3, SiLU, c->c' 3x3 stride 2, SiLU); conv_out (zero-initialised)."""

    def __init__(self, conditioning_embedding_channels: int = 320, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256), *, rngs: nnx.Rngs, dtype=None):
        ch = list(block_out_channels)
        self.conv_in = conv(conditioning_channels, ch[0], 3, padding=1, rngs=rngs, dtype=dtype)
        blocks = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            blocks.append(conv(cin, cin, 3, padding=1, rngs=rngs, dtype=dtype))
            blocks.append(conv(cin, cout, 3, stride=2, padding=1, rngs=rngs, dtype=dtype))
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(ch[-1], conditioning_embedding_channels, 3, padding=1, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, pose: jax.Array) -> jax.Array:
        """pose (B, f h, f w, 3) in [0, 1] -> (B, h, w, conditioning_embedding_channels); f = 2 ** (stages - 1)."""
        x = jax.nn.silu(self.conv_in(pose))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)
