"""Multi-head attention with the diffusers `Attention` parameter layout (to_q, to_k, to_v, to_out.0).

The kernel is chosen by name, so that a config can switch it per backend (`UNetConfig.attn_impl`, the DINOv2
model's `attn_impl`), and per run with the environment variable `IMAGPOSE_ATTN_IMPL`, which, when set, replaces
every name a model was built with (it is read when a program is traced):
- "einsum":  the reference form: the whole (B, H, Lq, Lk) float32 logits, softmax, weighted sum;
- "chunked": the same arithmetic for one (batch, head) and `chunk` queries at a time, in a loop inside the XLA
             program: memory O(chunk x Lk) instead of O(B H Lq Lk), in the backward pass too (each chunk is
             rematerialised). "chunked:N" sets the chunk; by default it is `default_chunk(Lk)` (2048 queries up
             to Lk = 4096, 512 at Lk = 16384); sequences shorter than the chunk are grouped, several (batch, head)
             rows per step. On the CPU it is also the fastest form
             from about a million logits up: a chunk's logits stay in cache;
- "xla":     `jax.nn.dot_product_attention(implementation="xla")`;
- "cudnn":   cuDNN flash attention (GPU; fp16/bf16, head dim a multiple of 8);
- "splash":  the Pallas splash-attention kernel (TPU; elsewhere it runs in Pallas interpret mode, good for tests
             only). Needs Lq and Lk multiples of 128; other shapes fall back to "xla". Mosaic kernels are not
             partitioned by XLA, so on a mesh of more than one device the kernel runs inside a `shard_map` over
             all the mesh's axes: batch split over its ('data', 'fsdp') axes as far as they divide B, heads over
             'tensor' where it divides H, the rest replicated;
- "auto":    GPU: "cudnn" where cuDNN takes the dtype and shape (sequences of 64 or more), else "xla";
             TPU: "splash" where the lengths allow, else "xla"; CPU: "chunked" from `CPU_CHUNK_MIN_ELEMENTS`
             logits (B·H·Lq·Lk) up, else "einsum".
Every choice follows the platform the program is compiled for (`target_platform`), not the process's default
backend: the platform of the mesh of the surrounding program (`jax.set_mesh`, or the mesh of the inputs'
shardings under a `jit` with `in_shardings`), `jax.default_backend()` without one. So a program compiled for a
TPU topology on a CPU-only machine (`jax.experimental.topologies`) holds the TPU kernels.
The measurements behind these choices: `benchmarks/attention.py`, results in `benchmarks/README.md`. (The CVA's
attention over 4 views is its own einsum in `cva.py`: at length 4 every form measured the same.)
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from imagpose_jax.models.layers import linear
from imagpose_jax.sharding.mesh import batch_split

IMPLS = ("auto", "einsum", "chunked", "xla", "cudnn", "splash")
ENV_VAR = "IMAGPOSE_ATTN_IMPL"
CHUNK_LOGITS = 2**23            # "chunked" default: about this many logits (32 MiB fp32) per loop step, ...
CHUNK_MIN, CHUNK_MAX = 256, 2048  # ... as a power-of-two number of queries in this range (measured on CPU)
CPU_CHUNK_MIN_ELEMENTS = 2**21  # CPU "auto": "chunked" from 2 Mi logits (8 MiB fp32) up, "einsum" below
SPLASH_BLOCKS = (512, 256, 128)
CUDNN_MIN_LEN = 64


def parse_impl(name: str) -> tuple[str, int | None]:
    """'chunked:256' -> ('chunked', 256); other names -> (name, None). Unknown names are an error."""
    kind, _, size = str(name).partition(":")
    if kind not in IMPLS or (size and kind != "chunked"):
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLS} ('chunked:N' sets the chunk)")
    if not size:
        return kind, None
    try:
        chunk = int(size)
    except ValueError:
        chunk = 0
    if chunk < 1:
        raise ValueError(f"attention chunk size must be a positive integer, got {name!r}")
    return kind, chunk


def program_mesh(x: jax.Array | None = None) -> jax.sharding.AbstractMesh | None:
    """The mesh of the program being traced: the context mesh (`jax.set_mesh`), else the mesh of `x`'s sharding
    (a `jit` with `in_shardings` on a mesh carries it in the avals, with no context mesh set); None without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty and x is not None:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", mesh)
    return None if mesh.empty else mesh


def target_platform(x: jax.Array | None = None) -> str:
    """"tpu", "gpu" or "cpu": the platform of `program_mesh(x)`'s devices, else `jax.default_backend()`."""
    mesh = program_mesh(x)
    return mesh.abstract_device.platform if mesh is not None else jax.default_backend()


def resolve_impl(impl: str, q: jax.Array, k: jax.Array, backend: str | None = None) -> tuple[str, int | None]:
    """The concrete (kind, chunk) that `dot_product_attention(q, k, v, impl)` runs, after the
    `IMAGPOSE_ATTN_IMPL` override and the "auto" choice for this shape and `backend` (default: the target
    platform, `target_platform(q)`)."""
    impl = os.environ.get(ENV_VAR) or impl
    kind, chunk = parse_impl(impl)
    if kind != "auto":
        return kind, chunk
    backend = backend or target_platform(q)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if backend in ("gpu", "cuda", "rocm"):
        return ("cudnn" if _cudnn_ok(q, k, backend) else "xla"), None
    if backend == "tpu":
        return ("splash" if _splash_blocks(lq, lk) else "xla"), None
    return ("chunked" if b * h * lq * lk >= CPU_CHUNK_MIN_ELEMENTS else "einsum"), None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Softmax attention, scale D**-0.5. q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D)."""
    kind, chunk = resolve_impl(impl, q, k)
    if kind == "einsum":
        return _einsum(q, k, v)
    if kind == "chunked":
        return _chunked(q, k, v, chunk or default_chunk(k.shape[1]))
    if kind == "splash" and _splash_blocks(q.shape[1], k.shape[1]):
        return _splash(q, k, v, interpret=target_platform(q) != "tpu")
    if kind == "splash":
        kind = "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=kind)


def default_chunk(lk: int) -> int:
    """Queries per step of "chunked" for `lk` keys: the power of two nearest below CHUNK_LOGITS / lk, within
    [CHUNK_MIN, CHUNK_MAX] (`benchmarks/attention.py`: 2048 was fastest at Lk <= 4096, 512 at Lk = 16384)."""
    n = max(1, CHUNK_LOGITS // max(lk, 1))
    return max(CHUNK_MIN, min(CHUNK_MAX, 1 << (n.bit_length() - 1)))


def _einsum(q, k, v):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _softmax_attention(q, k, v):
    """q (Lq, D), k (Lk, D), v (Lk, Dv) -> (Lq, Dv): float32 logits and softmax; the normalisation is applied
    to the (Lq, Dv) output rather than to the (Lq, Lk) weights (one pass less over the logits)."""
    logits = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("qk,kd->qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(-1, keepdims=True)).astype(v.dtype)


def _chunked(q, k, v, chunk: int):
    b, lq, h, d = q.shape
    dv = v.shape[-1]
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[-1])  # noqa: E731
    n, tail = divmod(lq, chunk)
    body = jax.checkpoint(_softmax_attention)  # backward recomputes a chunk's logits: memory stays O(chunk x Lk)

    def per_head(qkv):
        qq, kk, vv = qkv
        parts = []
        if n:
            full = qq[:n * chunk].reshape(n, chunk, d)
            parts.append(jax.lax.map(lambda qc: body(qc, kk, vv), full).reshape(n * chunk, dv))
        if tail:
            parts.append(body(qq[n * chunk:], kk, vv))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    # (B*H, Lq, Dv): one (batch, head) at a time, or, for short sequences, as many as make up about `chunk` queries
    out = jax.lax.map(per_head, (heads(q), heads(k), heads(v)), batch_size=max(1, chunk // lq))
    return out.reshape(b, h, lq, dv).transpose(0, 2, 1, 3)


# -- accelerator kernels -------------------------------------------------------------------------------------

def _cudnn_ok(q, k, platform: str = "gpu") -> bool:
    """cuDNN flash attention's conditions (jax's `check_is_flash_attention`): fp16/bf16, head dim a multiple of
    8 and at most 128 (256 from Hopper on: the compute capability of this process's `platform` devices, 128
    where it has none). Sequences shorter than `CUDNN_MIN_LEN` (the CVA's 4 views) are left to XLA: cuDNN works
    in tiles of 64-128 rows, so they would be mostly padding (a heuristic, not measured)."""
    d = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or d % 8 or min(q.shape[1], k.shape[1]) < CUDNN_MIN_LEN:
        return False
    try:
        cc = float(getattr(jax.devices(platform)[0], "compute_capability", "0"))
    except (ValueError, RuntimeError):
        cc = 0.0
    return d <= (256 if cc >= 9.0 else 128)


def _splash_blocks(lq: int, lk: int) -> tuple[int, int] | None:
    bq = next((s for s in SPLASH_BLOCKS if lq % s == 0), None)
    bk = next((s for s in SPLASH_BLOCKS if lk % s == 0), None)
    return None if bq is None or bk is None else (bq, bk)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only module; imported on use
    blocks = _splash_blocks(lq, lk)
    if blocks is None:
        raise ValueError(f"splash attention needs sequence lengths that are multiples of 128, got Lq={lq}, Lk={lk}")
    bq, bk = blocks
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk)) for _ in range(heads)])
    return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, *, interpret: bool):
    """Splash attention (no mask), per batch element and, on a mesh, per shard (`shard_map`: Mosaic kernels
    cannot be partitioned automatically). The kernel takes (H, L, D) and an unscaled softmax."""
    mesh = program_mesh(q)
    if mesh is None or mesh.size == 1 or mesh.are_all_axes_manual:
        return _splash_local(q, k, v, interpret=interpret)
    b, _, h, _ = q.shape
    batch = batch_split(mesh, b)
    heads = "tensor" if "tensor" in mesh.axis_names and h % mesh.shape["tensor"] == 0 else None
    spec = P(tuple(batch) or None, None, heads, None)
    fn = functools.partial(_splash_local, interpret=interpret)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, *, interpret: bool):
    _, lq, h, d = q.shape
    kernel = _splash_kernel(h, lq, k.shape[1], interpret)
    t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    fn = jax.vmap(kernel)
    if q.dtype in (jnp.bfloat16, jnp.float16):
        fn = _at_default_precision(fn)
    return t(fn(t(q * jnp.asarray(d ** -0.5, q.dtype)), t(k), t(v)))


def _at_default_precision(fn):
    """`fn` with its forward and backward traced at the default matmul precision: Mosaic rejects the fp32
    contract precision that `jax_default_matmul_precision="highest"` asks of 16-bit operands (whose products
    are exact in the kernel's fp32 accumulator anyway). The backward of a `custom_vjp` is traced outside any
    context around the call, hence the wrapper."""
    default = functools.partial(jax.default_matmul_precision, "default")

    @jax.custom_vjp
    def f(*args):
        with default():
            return fn(*args)

    def fwd(*args):
        with default():
            return jax.vjp(fn, *args)

    def bwd(vjp_fn, g):
        with default():
            return vjp_fn(g)

    f.defvjp(fwd, bwd)
    return f


class Attention(nnx.Module):
    """diffusers `Attention` with the default processor: no bias on q/k/v by default, bias on the output."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 bias: bool = False, impl: str = "auto", rngs: nnx.Rngs, dtype=None):
        parse_impl(impl)
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.impl = heads, impl
        self.to_q = linear(query_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_k = linear(kv_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_v = linear(kv_dim, inner, bias=bias, rngs=rngs, dtype=dtype)
        self.to_out_0 = linear(inner, query_dim, rngs=rngs, dtype=dtype)

    def split_heads(self, x: jax.Array) -> jax.Array:  # (..., L, H*D) -> (..., L, H, D)
        return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x (B, L, C), context (B, N, Cc) or None for self-attention -> (B, L, C)."""
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        out = dot_product_attention(q, k, v, self.impl)
        return self.to_out_0(out.reshape(*out.shape[:-2], -1))
