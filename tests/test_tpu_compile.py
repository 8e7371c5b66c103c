"""Programs compiled for a TPU topology on this (CPU-only) machine, through libtpu (the test extra): the kernel
choice follows the mesh's platform, not `jax.default_backend()`, and splash attention is partitioned by a
`shard_map`, so that the compiled TPU program holds the Mosaic kernel."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagpose_jax.models.attention import dot_product_attention, program_mesh, resolve_impl, target_platform
from imagpose_jax.models.init import abstract
from imagpose_jax.models.unet import UNet
from imagpose_jax.models.unet_config import UNetConfig
from imagpose_jax.train.aot import TPU_KERNEL as TPU_CALL  # a Mosaic (Pallas) kernel in the compiled HLO
from test_unet_remat import SMALL_UNET
from cpu_env import cpu_env

if sys.platform != "linux":
    pytest.skip("libtpu (the test extra's jax[tpu]) is built for Linux only", allow_module_level=True)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lockfile would keep concurrent sessions out


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    """v5e 2x2: four chips as a ('data', 'fsdp') mesh."""
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    return Mesh(np.array(topo.devices).reshape(2, 2), ("data", "fsdp"))


def spec(shape, sharding, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def test_auto_resolves_to_splash_for_a_tpu_mesh(mesh):
    assert jax.default_backend() == "cpu"
    q = jnp.zeros((4, 256, 2, 64), jnp.bfloat16)
    assert target_platform() == "cpu" and resolve_impl("auto", q, q) == ("einsum", None)  # no mesh: the CPU's choice
    with jax.set_mesh(mesh):  # the context mesh
        assert target_platform() == "tpu" and resolve_impl("auto", q, q) == ("splash", None)
    seen = []

    def f(x):  # no context mesh: the inputs' shardings name it
        seen.append((program_mesh(x).shape, target_platform(x), resolve_impl("auto", x, x)))
        return x
    s = NamedSharding(mesh, P(("data", "fsdp")))
    jax.jit(f, in_shardings=s).lower(spec(q.shape, s))
    assert seen == [({"data": 2, "fsdp": 2}, "tpu", ("splash", None))]


@pytest.mark.parametrize("batch", [4, 1])  # split over both batch axes; replicated (1 does not divide)
def test_splash_compiles_for_tpu_under_a_sharded_jit(mesh, batch):
    """Forward and backward of "auto" attention at the smallest lengths splash takes (Lk = 128, Lq = 256):
    three Mosaic kernels (forward, dq, dkv) in the TPU program, no "Mosaic kernels cannot be automatically
    partitioned" error."""
    s = NamedSharding(mesh, P(("data", "fsdp")) if batch % 4 == 0 else P())
    q, kv = spec((batch, 256, 2, 64), s), spec((batch, 128, 2, 64), s)
    loss = lambda q, k, v: dot_product_attention(q, k, v, "auto").astype(jnp.float32).sum()  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(s, s, s)).lower(q, kv, kv).compile()
    assert compiled.as_text().count(TPU_CALL) == 3


@pytest.mark.slow  # ~45 s; the tiny train step compiled for v5e in test_aot.py covers the UNet on TPU in CI
def test_unet_forward_compiles_for_tpu_with_a_sharded_batch(mesh):
    """A small CVA UNet on a 16x16 grid, batch 4 over ('data', 'fsdp'), parameters replicated: splash for the
    self-attention over 256 tokens, XLA for the cross-attention (8 tokens) and the mid block's 64 tokens."""
    cfg = UNetConfig(**SMALL_UNET)
    graphdef, params = nnx.split(abstract(lambda k: UNet(cfg, rngs=k)))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
    params = jax.tree.map(lambda p: spec(p.shape, rep, p.dtype), params)
    fn = lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)  # noqa: E731
    lowered = jax.jit(fn, out_shardings=batch).lower(
        params, spec((4, 16, 16, 9), batch, jnp.float32), spec((4,), batch, jnp.int32), spec((4, 8, 48), batch, jnp.float32))
    compiled = lowered.compile()
    assert compiled.as_text().count(TPU_CALL) == 3   # the spatial transformers at 16x16: 1 down, 2 up
    assert compiled.output_shardings.spec == P(("data", "fsdp"))


SHARDED_VALUES = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from imagpose_jax.models.attention import dot_product_attention
    from test_attention import qkv, reference
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
    q, k, v = qkv(2, 128, 128, 2, 32)
    s = NamedSharding(mesh, P("data"))
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, "splash"), in_shardings=(s, s, s))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v), atol=2e-6, rtol=1e-5)
    print("ok")
""")


def test_sharded_splash_values_on_four_cpu_devices():
    """The shard_map path runs (Pallas interpret mode) and equals the reference: batch 2 splits over 'data'."""
    r = subprocess.run([sys.executable, "-c", SHARDED_VALUES], env=cpu_env(4), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_vae_mid_attention_follows_the_tpu_mesh(mesh):
    """The frozen VAE's mid-block self-attention takes the platform's kernel: on a 128x128 grid its latents are
    16x16, 256 tokens, so the encoder's program for the TPU holds a splash kernel (at SD1.5's 128x128 latents the
    whole logits would be 1 GiB per image); the same program for the CPU holds none."""
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
    from imagpose_jax.testing import TINY_VAE
    graphdef, params = nnx.split(abstract(lambda k: AutoencoderKL(VAEConfig.from_dict(TINY_VAE), rngs=k)))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))
    params = jax.tree.map(lambda p: spec(p.shape, rep, p.dtype), params)
    fn = lambda p, x: nnx.merge(graphdef, p).encode(x)[0]  # noqa: E731
    x = spec((4, 128, 128, 3), batch, jnp.float32)
    assert jax.jit(fn).lower(params, x).as_text().count("tpu_custom_call") == 1
    cpu = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    assert jax.jit(fn).lower(cpu, jax.ShapeDtypeStruct(x.shape, x.dtype)).as_text().count("tpu_custom_call") == 0
