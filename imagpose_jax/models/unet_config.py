"""The UNet's configuration, read from a diffusers-style `config.json` (SD1.5's, or the original IMAGPose's
3D-UNet keyword arguments with its CVA (`use_motion_module`, `motion_module_*`) settings)."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

CROSS_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock3D")
PLAIN_DOWN = ("DownBlock2D", "DownBlock3D")
CROSS_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock3D")
PLAIN_UP = ("UpBlock2D", "UpBlock3D")
MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock3DCrossAttn")

# diffusers/AnimateDiff keys we accept only at these values (anything else is a different model).
FIXED = {
    "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None, "dropout": 0.0,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "mid_block_only_cross_attention": None, "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": 1, "unet_use_cross_frame_attention": (False, None),
    "unet_use_temporal_attention": (False, None), "motion_module_type": ("Vanilla", None),
}
REMAT = ("none", "block")
RUNTIME = ("remat", "remat_policy")  # settings left out of `to_dict`: how to run the model, not which model
IGNORED = {"sample_size", "upcast_attention", "use_inflated_groupnorm", "addition_embed_type_num_heads"}


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    cross_attention_dim: int = 768
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)   # diffusers' `attention_head_dim` quirk: a head *count*
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    use_linear_projection: bool = False
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    # Cross-view attention (the original's AnimateDiff-style motion modules).
    use_cva: bool = False
    cva_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    cva_mid_block: bool = True
    cva_decoder_only: bool = False
    cva_kwargs: Mapping = field(default_factory=lambda: {
        "num_attention_heads": 8, "num_transformer_block": 1, "attention_block_types": ("Temporal_Self", "Temporal_Self"),
        "temporal_position_encoding": True, "temporal_position_encoding_max_len": 32, "temporal_attention_dim_div": 1})
    attn_impl: str = "auto"
    # Gradient checkpointing inside the UNet (runtime choices, not part of the weights; not in `to_dict`):
    # "block" wraps each resnet, spatial transformer and CVA module in `nnx.remat`, so that the backward pass
    # rebuilds one block's activations at a time; `remat_policy` names a `jax.checkpoint_policies` entry
    # (what a block keeps, e.g. "dots_with_no_batch_dims_saveable"); None keeps only the block's inputs.
    remat: str = "none"
    remat_policy: str | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(f"{n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for t in self.down_block_types:
            if t not in CROSS_DOWN + PLAIN_DOWN:
                raise ValueError(f"unsupported down block type {t!r}")
        for t in self.up_block_types:
            if t not in CROSS_UP + PLAIN_UP:
                raise ValueError(f"unsupported up block type {t!r}")
        if self.mid_block_type not in MID:
            raise ValueError(f"unsupported mid block type {self.mid_block_type!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
        if self.remat_policy is not None:
            import jax
            if not callable(getattr(jax.checkpoint_policies, self.remat_policy, None)):
                raise ValueError(f"unknown jax.checkpoint_policies entry {self.remat_policy!r}")

    # -- where the CVA modules go (the original's rule: resolution level 2**i in `motion_module_resolutions`)
    def cva_in_down(self, i: int) -> bool:
        return self.use_cva and (2 ** i) in self.cva_resolutions and not self.cva_decoder_only

    def cva_in_up(self, i: int) -> bool:
        return self.use_cva and (2 ** (len(self.block_out_channels) - 1 - i)) in self.cva_resolutions

    @property
    def cva_in_mid(self) -> bool:
        return self.use_cva and self.cva_mid_block

    def replace(self, **kw) -> UNetConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping) -> UNetConfig:
        """Builds from diffusers-style keyword arguments; an unsupported setting is an error naming the key."""
        d = dict(d)
        for k in [k for k in d if k.startswith("_") or k in IGNORED]:
            d.pop(k)
        for k, ok in FIXED.items():
            if k in d:
                v = d.pop(k)
                allowed = ok if isinstance(ok, tuple) else (ok,)
                if isinstance(v, list):
                    v = tuple(v)
                if v not in allowed and not (k == "transformer_layers_per_block" and v and all(x == 1 for x in (v if isinstance(v, tuple) else (v,)))):
                    raise NotImplementedError(f"UNet config {k}={v!r} is not supported (supported: {allowed[0]!r})")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        heads = d.pop("num_attention_heads", None) or d.pop("attention_head_dim", 8)
        d.pop("attention_head_dim", None)
        kw = {"num_attention_heads": tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n}
        oca = d.pop("only_cross_attention", False)
        kw["only_cross_attention"] = tuple(oca) if isinstance(oca, (list, tuple)) else (oca,) * n
        renames = {"use_motion_module": "use_cva", "motion_module_resolutions": "cva_resolutions",
                   "motion_module_mid_block": "cva_mid_block", "motion_module_decoder_only": "cva_decoder_only"}
        for theirs, ours in renames.items():
            if theirs in d:
                v = d.pop(theirs)
                kw[ours] = tuple(v) if isinstance(v, list) else v
        if "motion_module_kwargs" in d:
            mk = dict(d.pop("motion_module_kwargs"))
            mk.pop("zero_initialize", None)
            if "attention_block_types" in mk:
                mk["attention_block_types"] = tuple(mk["attention_block_types"])
            kw["cva_kwargs"] = {**cls().cva_kwargs, **mk}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names:
                raise NotImplementedError(f"unknown UNet config key {k!r}={v!r}")
            kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UNetConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """Diffusers/original-style keyword arguments (round-trips through `from_dict`, but for `RUNTIME`)."""
        d = dataclasses.asdict(self)
        for k in RUNTIME:
            d.pop(k)
        d["attention_head_dim"] = list(d.pop("num_attention_heads"))
        d["use_motion_module"] = d.pop("use_cva")
        d["motion_module_resolutions"] = list(d.pop("cva_resolutions"))
        d["motion_module_mid_block"] = d.pop("cva_mid_block")
        d["motion_module_decoder_only"] = d.pop("cva_decoder_only")
        d["motion_module_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(d.pop("cva_kwargs")).items()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

