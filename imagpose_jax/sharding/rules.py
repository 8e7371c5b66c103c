"""One table of partition rules, applied alike to parameters, optimizer moments and EMA copies.

A rule is (regex, PartitionSpec); a leaf takes the first rule whose regex matches (`re.search`) its
dotted path (e.g. `model.unet.down_blocks.0.resnets.1.conv1.kernel`,
`optimizer.opt_state.1.0.mu.unet.conv_in.kernel`) and whose spec has the leaf's rank. A mesh axis
the mesh lacks, or one that does not divide its dimension, is dropped (that dimension is replicated),
so one table serves every mesh and model size.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, P]]

PARTITION_RULES: Rules = (
    # The frozen encoders (VAE, DINOv2: 0.6 GiB at SD1.5 size, no gradient or optimizer state) replicated: sharded,
    # their weights were gathered every step and XLA followed the kernels' channel split into the activations,
    # holding the whole global batch's VAE activations on every chip (`imagpose aot`, SD1.5 stage 3, v5e-16).
    (r"^(vae|dino)\.", P()),
    (r"kernel$", P(None, None, "tensor", "fsdp")),  # conv (kh, kw, Cin, Cout): output channels over fsdp
    (r"kernel$", P("fsdp", "tensor")),              # linear (in, out): input features over fsdp
    (r".*", P()),                                   # biases, norm scales, scalars, rng keys: replicated
)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with the axes that the mesh lacks or that do not divide their dimension replaced by None."""
    out = []
    for axis, dim in zip(spec, shape):
        ok = axis is not None and axis in mesh.shape and dim % mesh.shape[axis] == 0
        out.append(axis if ok else None)
    return P(*out)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules = PARTITION_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path) and (len(spec) == len(shape) or spec == P()):
            return _fit(spec, shape, mesh) if len(spec) else P()
    raise ValueError(f"no partition rule for {path} of shape {shape}")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = PARTITION_RULES) -> nnx.State:
    """NamedShardings with the structure of `state` (abstract or concrete), from the rules."""
    def one(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        sharding = NamedSharding(mesh, spec_for(name, tuple(getattr(leaf, "shape", ())), mesh, rules))
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
