"""Attention kernels: every implementation that runs on the CPU equals a float64 reference; the switch by name."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagpose_jax.models import attention as attn
from imagpose_jax.models.attention import Attention, dot_product_attention, parse_impl, resolve_impl
from imagpose_jax.models.init import ParamKeys


def reference(q, k, v) -> np.ndarray:
    """float64 softmax attention, (B, Lq, H, D) layout."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def qkv(b, lq, lk, h, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, n, h, d)).astype(dtype) * s for n, s in ((lq, 1.5), (lk, 1.5), (lk, 1.0)))


SHAPES = {  # (B, Lq, Lk, H, D)
    "self": (2, 64, 64, 4, 40),
    "cross": (2, 37, 77, 3, 16),          # Lk != Lq, odd lengths
    "views": (6, 4, 4, 2, 8),             # the CVA: many length-4 sequences
}
CPU_IMPLS = ["einsum", "xla", "chunked", "chunked:16", "chunked:5", "chunked:1", "chunked:100", "auto"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_matches_float64_reference(impl, shape):
    """Incl. chunks that do not divide Lq (5 into 64 and 37), longer than Lq (100), and for short sequences
    groups of (batch, head) rows that do not divide B*H (chunked:5 on length 4 groups 1, chunked:16 groups 4 of 12)."""
    q, k, v = qkv(*SHAPES[shape])
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl))(q, k, v)
    assert out.shape == q.shape[:3] + (v.shape[-1],)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_splash_interpret_mode_matches_reference():
    """The TPU kernel, run in Pallas interpret mode on the CPU (lengths multiples of 128; cross-attention too)."""
    q, k, v = qkv(1, 128, 256, 2, 32)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "splash"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_splash_falls_back_to_xla_for_other_lengths():
    q, k, v = qkv(1, 24, 77, 2, 8)
    out = dot_product_attention(q, k, v, "splash")
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_chunked_gradients_match_einsum():
    q, k, v = qkv(2, 37, 29, 2, 8, seed=1)
    loss = lambda impl: lambda q, k, v: (dot_product_attention(q, k, v, impl) ** 2).sum()  # noqa: E731
    g_ref = jax.jit(jax.grad(loss("einsum"), argnums=(0, 1, 2)))(q, k, v)
    g = jax.jit(jax.grad(loss("chunked:8"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["einsum", "chunked:16", "xla"])
def test_bfloat16_inputs(impl):
    q, k, v = qkv(2, 48, 33, 2, 16, seed=2)
    out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=0.05, rtol=0.05)


def test_chunked_memory_is_bounded():
    """XLA's temp buffers for chunked attention stay near chunk x Lk, far below the full logits."""
    q = jax.ShapeDtypeStruct((2, 2048, 4, 8), jnp.float32)
    temp = lambda impl: jax.jit(lambda q, k, v: dot_product_attention(q, k, v, impl)).lower(  # noqa: E731
        q, q, q).compile().memory_analysis().temp_size_in_bytes
    full_logits = 2 * 4 * 2048 * 2048 * 4
    assert temp("chunked:128") < full_logits / 8


def test_parse_and_resolve():
    assert parse_impl("chunked:256") == ("chunked", 256) and parse_impl("auto") == ("auto", None)
    for bad in ("flash", "xla:4", "chunked:0", "chunked:x"):
        with pytest.raises(ValueError):
            parse_impl(bad)
    big = jnp.zeros((2, 4096, 8, 40)), jnp.zeros((2, 4096, 8, 40))
    small = jnp.zeros((2, 64, 8, 40)), jnp.zeros((2, 77, 8, 40))
    half = jnp.zeros((2, 4096, 8, 40), jnp.bfloat16), jnp.zeros((2, 77, 8, 40), jnp.bfloat16)
    views = jnp.zeros((2048, 4, 8, 40), jnp.bfloat16), jnp.zeros((2048, 4, 8, 40), jnp.bfloat16)
    assert resolve_impl("auto", *big, backend="cpu") == ("chunked", None)
    assert resolve_impl("auto", *small, backend="cpu") == ("einsum", None)
    assert resolve_impl("auto", *half, backend="gpu") == ("cudnn", None)
    assert resolve_impl("auto", *big, backend="gpu") == ("xla", None)       # fp32: no cuDNN flash
    assert resolve_impl("auto", *views, backend="gpu") == ("xla", None)     # length-4 sequences
    assert resolve_impl("auto", *big, backend="tpu") == ("splash", None)
    assert resolve_impl("auto", *half, backend="tpu") == ("xla", None)      # 77 is no multiple of 128
    assert resolve_impl("xla", *big, backend="gpu") == ("xla", None)
    assert [attn.default_chunk(n) for n in (4, 4096, 8192, 16384, 10**6)] == [2048, 2048, 1024, 512, 256]


def test_environment_overrides_the_configured_name(monkeypatch):
    q, k, v = qkv(1, 16, 16, 2, 8)
    monkeypatch.setenv(attn.ENV_VAR, "chunked:4")
    assert resolve_impl("einsum", q, k) == ("chunked", 4)
    out = dot_product_attention(q, k, v, "einsum")
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6, rtol=1e-5)
    monkeypatch.setenv(attn.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        dot_product_attention(q, k, v, "einsum")


def test_module_switch_keeps_the_output():
    """The same `Attention` weights under each name give the same result; a bad name fails at construction."""
    x = np.random.default_rng(3).standard_normal((2, 50, 32)).astype(np.float32)
    ctx = np.random.default_rng(4).standard_normal((2, 9, 24)).astype(np.float32)
    outs = {}
    for impl in ("einsum", "chunked:7", "xla"):
        m = Attention(32, 4, 8, cross_attention_dim=24, impl=impl, rngs=ParamKeys(0))
        outs[impl] = np.asarray(nnx.jit(lambda m, x, c: m(x, c))(m, x, ctx))
    for impl in ("chunked:7", "xla"):
        np.testing.assert_allclose(outs[impl], outs["einsum"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        Attention(32, 4, 8, impl="flash", rngs=ParamKeys(0))


def test_unet_config_reaches_the_kernels(monkeypatch):
    """`UNetConfig.attn_impl` is the name every spatial attention is built with."""
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.unet import UNet
    from imagpose_jax.models.unet_config import UNetConfig
    cfg = UNetConfig(block_out_channels=(32, 32, 64, 64), cross_attention_dim=16, use_cva=True, attn_impl="chunked:64")
    unet = abstract(lambda k: UNet(cfg, rngs=k))
    impls = {m.impl for _, m in nnx.iter_graph(unet) if isinstance(m, Attention)}
    assert impls == {"chunked:64"}


def test_splash_bfloat16_gradients_at_highest_precision():
    """bf16 splash (interpret mode), forward and backward, under the tests' `jax_default_matmul_precision=
    "highest"`, which Mosaic on a TPU rejects for 16-bit operands: the kernel is traced at default precision."""
    assert jax.config.jax_default_matmul_precision == "highest"
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(1, 128, 128, 2, 32, seed=5))
    loss = lambda impl: lambda q, k, v: (dot_product_attention(q, k, v, impl).astype(jnp.float32) ** 2).sum()  # noqa: E731
    g = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss("einsum"), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(g, g_ref):  # bf16 rounding: about 0.6% of the largest entry, as for einsum in bf16
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.02 * np.abs(b).max())
