"""DINOv2 (transformers' `Dinov2Model`) in Flax NNX: normalised NHWC images -> `last_hidden_state`.

Attribute and parameter names mirror the transformers state dict (`embeddings.patch_embeddings.projection`,
`encoder.layer.{i}.attention.attention.query`, `encoder.layer.{i}.layer_scale1.lambda1`, ...) so that
`convert_weights.dinov2` maps checkpoints with the generic rules of `convert_weights.core`.

Position embeddings are resized for patch grids other than the stored one, as transformers does it, in
one of two ways (`Dinov2Config.pos_interpolation`):
- "scale_factor" (default): older transformers, e.g. 4.40, which ran the original IMAGPose: bicubic with
  `scale_factor = (grid + 0.1) / stored_grid`, so source coordinates are scaled by stored/(grid + 0.1);
- "size": current transformers (5.x, installed here): bicubic to `size = grid`, source coordinates scaled by stored/grid.
Both skip the resize when the number of patches equals the stored one and the image is square (in pixels).
This matters in practice: DINOv2-base stores a 37x37 grid (518 px) and IMAGPose feeds it 224 px (16x16).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagpose_jax.models.attention import dot_product_attention
from imagpose_jax.models.layers import ACTIVATIONS, conv, layer_norm, linear, weights

POS_INTERPOLATIONS = ("scale_factor", "size")


@dataclass(frozen=True)
class Dinov2Config:
    """The fields of a transformers DINOv2 `config.json` that shape `Dinov2Model`, plus `pos_interpolation`.

    The MLP width is `int(hidden_size * mlp_ratio)`, as transformers builds it; the file's
    `intermediate_size` is ignored there and here.
    """
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    use_mask_token: bool = True
    pos_interpolation: str = "scale_factor"

    def __post_init__(self):
        for name in ("patch_size", "image_size"):
            if not isinstance(getattr(self, name), int):
                raise NotImplementedError(f"DINOv2 {name} must be a single int, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"DINOv2 hidden_act {self.hidden_act!r} unsupported; "
                                      f"supported: {sorted(ACTIVATIONS)}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {self.pos_interpolation!r}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Side of the stored position-embedding grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping, **overrides) -> "Dinov2Config":
        """From a transformers `config.json` dict; `overrides` set fields (e.g. `pos_interpolation`)."""
        if d.get("use_swiglu_ffn", False):
            raise NotImplementedError("DINOv2 with use_swiglu_ffn=True (the giant model) is not supported")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**{**kw, **overrides})


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bicubic resize along one axis (A = -0.75, align_corners=False,
    border indices clamped); `scale` maps output to input coordinates. Computed in float32 as PyTorch does."""
    a, scale = np.float32(-0.75), np.float32(scale)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    i0 = np.floor(src)
    t = src - i0
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1           # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a        # 1 < |x| < 2
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
        np.add.at(m, (rows, np.clip(i0.astype(np.int64) - 1 + k, 0, n_in - 1)), w)
    return m


class Dinov2PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=None):
        p = cfg.patch_size
        self.projection = conv(cfg.num_channels, cfg.hidden_size, p, stride=p, padding="VALID", rngs=rngs, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.projection(pixels)  # (B, H, W, C) -> (B, H/p, W/p, D)


class Dinov2Embeddings(nnx.Module):
    """CLS token + patch embeddings (+ mask token where masked) + (resized) position embeddings."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=None):
        d, init, pdt = cfg.hidden_size, nnx.initializers.truncated_normal(0.02), weights(dtype)
        self.cfg = cfg
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), pdt))
        self.mask_token = nnx.Param(jnp.zeros((1, d), pdt)) if cfg.use_mask_token else None
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, cfg.grid ** 2 + 1, d), pdt))
        self.patch_embeddings = Dinov2PatchEmbeddings(cfg, rngs=rngs, dtype=dtype)

    def position_encoding(self, height: int, width: int, gh: int, gw: int) -> jax.Array:
        """(1, 1 + gh*gw, D) position embeddings for an image of height x width pixels (gh x gw patches)."""
        pos = self.position_embeddings[...]                                 # (1, 1+M, D)
        m = pos.shape[1] - 1
        if gh * gw == m and height == width:
            return pos
        side = int(m ** 0.5)
        if self.cfg.pos_interpolation == "size":
            scales = (side / gh, side / gw)
        else:
            factors = ((gh + 0.1) / math.sqrt(m), (gw + 0.1) / math.sqrt(m))
            if (math.floor(side * factors[0]), math.floor(side * factors[1])) != (gh, gw):
                raise ValueError(f"cannot resize the {side}x{side} position grid to {gh}x{gw} by scale factor")
            scales = (1.0 / factors[0], 1.0 / factors[1])
        grid = pos[0, 1:].reshape(side, side, -1).astype(jnp.float32)         # (side, side, D)
        grid = jnp.einsum("ys,xt,std->yxd", bicubic_matrix(side, gh, scales[0]),
                          bicubic_matrix(side, gw, scales[1]), grid,
                          precision=jax.lax.Precision.HIGHEST)                # (gh, gw, D)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1).astype(pos.dtype)], axis=1)

    def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        """pixels (B, H, W, C), bool_masked_pos (B, N) or None -> (B, 1+N, D)."""
        b, height, width, _ = pixels.shape
        x = self.patch_embeddings(pixels)                                   # (B, gh, gw, D)
        gh, gw = x.shape[1:3]
        x = x.reshape(b, gh * gw, -1)                                       # (B, N, D)
        if bool_masked_pos is not None:
            x = jnp.where(bool_masked_pos[..., None], self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)                               # (B, 1+N, D)
        return x + self.position_encoding(height, width, gh, gw).astype(x.dtype)


class Dinov2SelfAttention(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, impl: str, rngs: nnx.Rngs, dtype=None):
        d = cfg.hidden_size
        self.heads, self.impl = cfg.num_attention_heads, impl
        self.query = linear(d, d, bias=cfg.qkv_bias, rngs=rngs, dtype=dtype)
        self.key = linear(d, d, bias=cfg.qkv_bias, rngs=rngs, dtype=dtype)
        self.value = linear(d, d, bias=cfg.qkv_bias, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, D) -> (B, L, D), heads merged."""
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)          # (B, L, H, D/H)
        out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), self.impl)
        return out.reshape(*x.shape[:-1], -1)


class Dinov2SelfOutput(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=None):
        self.dense = linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class Dinov2Attention(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, impl: str, rngs: nnx.Rngs, dtype=None):
        self.attention = Dinov2SelfAttention(cfg, impl=impl, rngs=rngs, dtype=dtype)
        self.output = Dinov2SelfOutput(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class Dinov2LayerScale(nnx.Module):
    def __init__(self, cfg: Dinov2Config, dtype=None):
        self.lambda1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, weights(dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(x.dtype)


class Dinov2MLP(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=None):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = linear(cfg.hidden_size, cfg.mlp_hidden, rngs=rngs, dtype=dtype)
        self.fc2 = linear(cfg.mlp_hidden, cfg.hidden_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Dinov2Layer(nnx.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: Dinov2Config, *, impl: str, rngs: nnx.Rngs, dtype=None):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = layer_norm(d, eps, rngs=rngs, dtype=dtype)
        self.attention = Dinov2Attention(cfg, impl=impl, rngs=rngs, dtype=dtype)
        self.layer_scale1 = Dinov2LayerScale(cfg, dtype)
        self.norm2 = layer_norm(d, eps, rngs=rngs, dtype=dtype)
        self.mlp = Dinov2MLP(cfg, rngs=rngs, dtype=dtype)
        self.layer_scale2 = Dinov2LayerScale(cfg, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, impl: str, rngs: nnx.Rngs, dtype=None):
        n = cfg.num_hidden_layers
        self.layer = nnx.List([Dinov2Layer(cfg, impl=impl, rngs=rngs, dtype=dtype) for _ in range(n)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x)
        return x


class Dinov2Model(nnx.Module):
    """`Dinov2Model(cfg, rngs=...)(pixels)` -> `last_hidden_state` (B, 1+N, D), final layer norm applied.

    `pixels` (B, H, W, C) are already normalised (see `imagpose_jax.preprocess.clip_preprocess`); N is
    (H // patch) * (W // patch). `dtype`: see `models.layers` (None: float32); `attn_impl` is the
    attention kernel (see `imagpose_jax.models.attention`).
    """

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs, dtype=None, attn_impl: str = "auto"):
        self.embeddings = Dinov2Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.encoder = Dinov2Encoder(cfg, impl=attn_impl, rngs=rngs, dtype=dtype)
        self.layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None) -> jax.Array:
        """pixels (B, H, W, C), bool_masked_pos (B, N) or None -> (B, 1+N, D)."""
        return self.layernorm(self.encoder(self.embeddings(pixels, bool_masked_pos)))
