"""Stable Diffusion 1.5's UNet on the 2x2 view grid, with IMAGPose's cross-view attention (CVA).

Parameter names follow the PyTorch original (`down_blocks.0.resnets.1.conv1`, `...motion_modules.0...`),
so conversion is a short rename table. Everything is NHWC: sample (B, h, w, 9) -> (B, h, w, 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagpose_jax.models.attention import program_mesh
from imagpose_jax.models.cva import CrossViewAttention
from imagpose_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from imagpose_jax.models.layers import activation, conv, group_norm
from imagpose_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from imagpose_jax.models.transformer import Transformer2DModel
from imagpose_jax.models.unet_config import CROSS_DOWN, CROSS_UP, UNetConfig
from imagpose_jax.sharding.mesh import constrain_batch


class _Remat(nnx.Module):
    """`self._run(module, *args)` is `module(*args)`, rematerialised in the backward pass with `cfg.remat ==
    "block"`: `jax.checkpoint` around the module applied to its split state (the module tree, hence the parameter
    names, stay the same). Functional, with nothing written back to the module (a block holds no mutable state),
    so that it also runs inside a loop traced below the module's own trace (the sampler's `fori_loop` over the
    steps, where `nnx.remat`'s write-back raised `TraceContextError` on a model built with remat "block")."""

    def _set_remat(self, cfg: UNetConfig):
        self.remat, self.remat_policy = cfg.remat, cfg.remat_policy

    def _run(self, module, *args):
        mesh = program_mesh(args[0])   # on a mesh: the block's input and output batch-split (`constrain_batch`)
        x, *rest = constrain_batch(args[0], mesh), *args[1:]
        if self.remat == "none":
            return constrain_batch(module(x, *rest), mesh)
        policy = getattr(jax.checkpoint_policies, self.remat_policy) if self.remat_policy else None
        graphdef, state = nnx.split(module)
        apply = lambda st, *a: nnx.merge(graphdef, st)(*a)  # noqa: E731
        return constrain_batch(jax.checkpoint(apply, policy=policy)(state, x, *rest), mesh)


class _Block(_Remat):
    """Shared layer loop of the down/up blocks: resnet -> (spatial transformer) -> (CVA), per layer."""

    def _build(self, cfg: UNetConfig, cins: list[int], cout: int, heads: int, cross: bool, cva: bool,
               only_cross: bool, rngs: nnx.Rngs, dtype):
        self._set_remat(cfg)
        temb = cfg.block_out_channels[0] * 4
        self.resnets = nnx.List([ResnetBlock2D(c, cout, temb_channels=temb, groups=cfg.norm_num_groups,
                                               eps=cfg.norm_eps, act_fn=cfg.act_fn, rngs=rngs, dtype=dtype) for c in cins])
        self.attentions = nnx.List([Transformer2DModel(
            cout, heads, cfg.cross_attention_dim, groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
            only_cross_attention=only_cross, attn_impl=cfg.attn_impl, rngs=rngs, dtype=dtype) for _ in cins] if cross else [])
        self.motion_modules = nnx.List([CrossViewAttention(cout, **cfg.cva_kwargs, rngs=rngs, dtype=dtype)
                                        for _ in cins] if cva else [])

    def _layer(self, i: int, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        h = self._run(self.resnets[i], h, temb)
        if len(self.attentions):
            h = self._run(self.attentions[i], h, context)
        if len(self.motion_modules):
            h = self._run(self.motion_modules[i], h)
        return h


class DownBlock(_Block):
    def __init__(self, cfg: UNetConfig, i: int, *, rngs: nnx.Rngs, dtype=None):
        cin = cfg.block_out_channels[max(i - 1, 0)]
        cout = cfg.block_out_channels[i]
        self._build(cfg, [cin] + [cout] * (cfg.layers_per_block - 1), cout, cfg.num_attention_heads[i],
                    cfg.down_block_types[i] in CROSS_DOWN, cfg.cva_in_down(i), cfg.only_cross_attention[i], rngs, dtype)
        last = i == len(cfg.block_out_channels) - 1
        self.downsamplers = nnx.List([] if last else [Downsample2D(cout, padding=cfg.downsample_padding, rngs=rngs, dtype=dtype)])

    def __call__(self, h, temb, context):
        skips = []
        for j in range(len(self.resnets)):
            h = self._layer(j, h, temb, context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class UpBlock(_Block):
    def __init__(self, cfg: UNetConfig, i: int, *, rngs: nnx.Rngs, dtype=None):
        rev = list(reversed(cfg.block_out_channels))
        n = len(rev)
        prev, cout, cin = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
        layers = cfg.layers_per_block + 1
        cins = [(prev if j == 0 else cout) + (cin if j == layers - 1 else cout) for j in range(layers)]
        heads = list(reversed(cfg.num_attention_heads))[i]
        only_cross = list(reversed(cfg.only_cross_attention))[i]
        self._build(cfg, cins, cout, heads, cfg.up_block_types[i] in CROSS_UP, cfg.cva_in_up(i), only_cross, rngs, dtype)
        self.upsamplers = nnx.List([] if i == n - 1 else [Upsample2D(cout, rngs=rngs, dtype=dtype)])

    def __call__(self, h, skips, temb, context):
        for j in range(len(self.resnets)):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self._layer(j, h, temb, context)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(_Remat):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self._set_remat(cfg)
        c = cfg.block_out_channels[-1]
        temb = cfg.block_out_channels[0] * 4
        res = lambda: ResnetBlock2D(c, c, temb_channels=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,  # noqa: E731
                                    act_fn=cfg.act_fn, output_scale_factor=cfg.mid_block_scale_factor, rngs=rngs, dtype=dtype)
        self.resnets = nnx.List([res(), res()])
        self.attentions = nnx.List([Transformer2DModel(
            c, cfg.num_attention_heads[-1], cfg.cross_attention_dim, groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection, attn_impl=cfg.attn_impl, rngs=rngs, dtype=dtype)])
        self.motion_modules = nnx.List([CrossViewAttention(c, **cfg.cva_kwargs, rngs=rngs, dtype=dtype)] if cfg.cva_in_mid else [])

    def __call__(self, h, temb, context):
        h = self._run(self.resnets[0], h, temb)
        h = self._run(self.attentions[0], h, context)
        if len(self.motion_modules):
            h = self._run(self.motion_modules[0], h)
        return self._run(self.resnets[1], h, temb)


class UNet(nnx.Module):
    """SD1.5 UNet; with `cfg.use_cva` a CVA module follows each spatial transformer (and each resnet of the
    blocks without attention). `pose_features` (B, h, w, C0) are added to the output of `conv_in`.
    `cfg.remat="block"` checkpoints each resnet, spatial transformer and CVA module on its own (with
    `cfg.remat_policy`), so that the backward pass holds one block's activations at a time (the training configs'
    `c.unet.remat`; the one remat setting of the train step)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self.cfg = cfg
        c0 = cfg.block_out_channels[0]
        n = len(cfg.block_out_channels)
        self.conv_in = conv(cfg.in_channels, c0, 3, padding=1, rngs=rngs, dtype=dtype)
        self.time_embedding = TimestepEmbedding(c0, c0 * 4, cfg.act_fn, rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List([DownBlock(cfg, i, rngs=rngs, dtype=dtype) for i in range(n)])
        self.mid_block = MidBlock(cfg, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([UpBlock(cfg, i, rngs=rngs, dtype=dtype) for i in range(n)])
        self.conv_norm_out = group_norm(c0, cfg.norm_num_groups, cfg.norm_eps, rngs=rngs, dtype=dtype)
        self.conv_out = conv(c0, cfg.out_channels, 3, padding=1, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.act_fn)

    @property
    def grid_multiple(self) -> int:
        """The latent grid's height and width must be multiples of this."""
        levels = 2 ** (len(self.cfg.block_out_channels) - 1)
        return levels * 2 if self.cfg.use_cva else levels

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 pose_features: jax.Array | None = None) -> jax.Array:
        """sample (B, h, w, Cin), timesteps (B,) or scalar, context (B, N, D), pose_features (B, h, w, C0)
        -> (B, h, w, Cout)."""
        b, h, w, cin = sample.shape
        if cin != self.cfg.in_channels:
            raise ValueError(f"UNet expects {self.cfg.in_channels} input channels, got sample of shape {sample.shape}")
        m = self.grid_multiple
        if h % m or w % m:
            raise ValueError(f"latent grid {h}x{w} is not a multiple of {m}: each view's height and width must be "
                             f"multiples of {m * 4} pixels (the grid is 2x2 views, 8 pixels per latent)")
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                                      self.cfg.freq_shift).astype(sample.dtype))
        x = self.conv_in(sample)
        if pose_features is not None:
            x = x + pose_features
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips.extend(s)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, skips[-n:], temb, context)
            skips = skips[:-n]
        return self.conv_out(self.act(self.conv_norm_out(x)))
