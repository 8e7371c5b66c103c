"""Per-block rematerialisation inside the UNet (`UNetConfig.remat="block"`): same parameters, same values, far
fewer activations kept for the backward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagpose_jax.models.init import abstract
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig
from imagpose_jax.testing import TINY_UNET

# The tiny models' UNet with CVA (two levels, one layer each, CVA at both): every kind of wrapped module (resnet,
# spatial transformer, CVA), quick to compile.
SMALL_UNET = dict(TINY_UNET, use_cva=True)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # 13 s, not 40 s


def loss_fn(graphdef, x, c):
    return lambda params: (nnx.merge(graphdef, params)(x, jnp.full((x.shape[0],), 500), c) ** 2).mean()


@pytest.mark.slow  # ~50 s on 2 cores: the suite's time budget; run with -m slow
def test_same_parameters_and_values():
    """Parameter paths (hence the converters) unchanged; loss and gradients equal to float32 rounding."""
    x, c = np.random.default_rng(0).standard_normal((2, 8, 8, 9)), np.random.default_rng(1).standard_normal((2, 5, 48))
    x, c = x.astype(np.float32), c.astype(np.float32)
    results = []
    for remat in ("none", "block"):
        graphdef, shapes = nnx.split(abstract(lambda k: UNet(UNetConfig(**SMALL_UNET, remat=remat), rngs=k)))
        rng = np.random.default_rng(2)  # random weights (none zero-initialised), the same for both
        params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(s.dtype), shapes)
        step = jax.jit(jax.value_and_grad(loss_fn(graphdef, x, c))).lower(params).compile(FAST_COMPILE)
        results.append(step(params))
    (l0, g0), (l1, g1) = results
    assert [p for p, _ in nnx.to_flat_state(g1)] == [p for p, _ in nnx.to_flat_state(g0)]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def residual_bytes(cfg: UNetConfig, hw: int) -> int:
    """Bytes of activations the backward pass keeps from the forward (the VJP's residuals, parameters excluded)."""
    graphdef, params = nnx.split(abstract(lambda k: UNet(cfg, rngs=k)))
    x, c = jax.ShapeDtypeStruct((1, hw, hw, 9), jnp.float32), jax.ShapeDtypeStruct((1, 16, 48), jnp.float32)
    res = jax.eval_shape(lambda p, x, c: jax.vjp(loss_fn(graphdef, x, c), p)[1], params, x, c)
    size = lambda t: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(t))  # noqa: E731
    return size(res) - size(params)


def test_block_remat_keeps_fewer_activations():
    """The small two-level UNet on a 32x32 grid: 67.5 MiB without remat, 21.1 MiB per block keeping the weight
    matmuls' outputs, 3.4 MiB per block keeping nothing but its inputs (SD's four levels, 32/32/64/64 channels: 131,
    33 and 4.4 MiB; three times the tracing). CPU XLA schedules the recomputations early, so its temp bytes barely
    move; compiled for a TPU they fall (see README)."""
    cfg = UNetConfig(**SMALL_UNET)
    none, dots, block = (residual_bytes(cfg.replace(remat=r, remat_policy=p), 32) for r, p in (
        ("none", None), ("block", "dots_with_no_batch_dims_saveable"), ("block", None)))
    assert block * 15 < none and block * 4 < dots < none / 3


def test_config():
    cfg = UNetConfig(remat="block", remat_policy="dots_saveable")
    assert "remat" not in cfg.to_dict() and "remat_policy" not in cfg.to_dict()  # runtime choices, not the model's
    assert UNetConfig.from_dict({**cfg.to_dict(), "remat": "block"}).remat == "block"
    with pytest.raises(ValueError, match="remat"):
        UNetConfig(remat="full")
    with pytest.raises(ValueError, match="checkpoint_policies"):
        UNetConfig(remat="block", remat_policy="saves_nothing")
