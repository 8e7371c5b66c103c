"""Attention kernels at the UNet's shapes, against PyTorch's `scaled_dot_product_attention` on the same machine.

  python -m benchmarks.attention                 # all cases
  python -m benchmarks.attention --cases self4096,cross77 --repeats 3
  python -m benchmarks.attention --dtype bfloat16   # (GPU/TPU: cudnn / splash take part)

Every candidate of `imagpose_jax.models.attention` that runs on this backend is timed (min of --repeats
round-robin runs after a warm-up, compile excluded), checked against PyTorch's output, and its XLA temp memory is read from the
compiled program; "auto" is reported as what it resolves to. The CVA case is attention over the 4 views at each
position: B*N sequences of length 4; "einsum (B,F,N) form" is what the CVA module itself runs
(`imagpose_jax.models.cva.ViewAttention`, on its (B, views, positions, heads, dim) layout).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import machine_info, table, timed, write_result

B, H = 2, 8
# name: (batch, Lq, Lk, head dim, what it is)
CASES = {
    "self4096": (B, 4096, 4096, 40, "self-attn, 2x2 grid of 256x256 views, level 0 (64x64 latents)"),
    "self1024": (B, 1024, 1024, 80, "self-attn, 256x256 views, level 1"),
    "self256": (B, 256, 256, 160, "self-attn, 256x256 views, level 2"),
    "cross77": (B, 4096, 77, 40, "cross-attn to 77 tokens, level 0"),
    "cross257": (B, 4096, 257, 40, "cross-attn to 257 DINOv2 tokens, level 0"),
    "cva4": (B * 1024, 4, 4, 40, "CVA: 4 views at each of 2x1024 positions, level 0"),
    "self16384": (B, 16384, 16384, 40, "self-attn, 2x2 grid of 512x512 views, level 0 (128x128 latents)"),
}
FULL_LOGITS_LIMIT_GIB = 4.0  # candidates that hold the whole logits are skipped above this


def candidates(backend: str, dtype: str) -> list[str]:
    names = ["auto", "einsum", "xla", "chunked:256", "chunked:512", "chunked:1024", "chunked:2048"]
    if backend == "gpu" and dtype != "float32":
        names.append("cudnn")
    if backend == "tpu":
        names.append("splash")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", help="comma-separated implementation names to time (default: all on this backend)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", help="result JSON (default benchmarks/results/attention_<backend>.json)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from imagpose_jax.models.attention import default_chunk, dot_product_attention, resolve_impl
    torch = None
    if not a.no_torch:
        import torch

    backend = jax.default_backend()
    dtype = getattr(jnp, a.dtype)
    rows = []
    for name in a.cases.split(","):
        b, lq, lk, d, what = CASES[name]
        repeats = a.repeats if lq * lk <= 4096 * 4096 else min(a.repeats, 3)
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, n, H, d), np.float32) for n in (lq, lk, lk))
        runs = []  # (row, zero-argument callable), timed round-robin below
        ref = None
        if torch is not None:  # diffusers' call: (B, L, H, D) views transposed to (B, H, L, D)
            tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
            tq, tk, tv = (torch.from_numpy(x).to(tdt).transpose(1, 2) for x in (q, k, v))
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
            with torch.inference_mode():
                ref = sdpa().transpose(1, 2).float().numpy()
            runs.append(({"case": name, "impl": "torch sdpa", "max_abs_diff": 0.0}, sdpa))
        qj, kj, vj = (jnp.asarray(x, dtype) for x in (q, k, v))
        logits_gib = b * H * lq * lk * 4 / 2**30
        for impl in (a.impls.split(",") if a.impls else candidates(backend, a.dtype)):
            kind, chunk = resolve_impl(impl, qj, kj)
            if kind == "chunked" and not chunk:
                chunk = default_chunk(lk)
            label = impl if impl != "auto" else f"auto -> {kind}" + (f":{chunk}" if kind == "chunked" else "")
            if kind in ("einsum", "xla") and logits_gib > FULL_LOGITS_LIMIT_GIB:
                rows.append({"case": name, "impl": label, "ms": "skipped", "note": f"needs {logits_gib:.0f} GiB of logits"})
                continue
            runs.append(_compile(name, label, lambda q, k, v, impl=impl: dot_product_attention(q, k, v, impl),
                                 (qj, kj, vj), ref))
        if name == "cva4":  # what the CVA module runs: its own einsum on (B, F, N, H, D)
            n = b // B
            to_bfn = lambda x: jnp.asarray(x.reshape(B, n, lq, H, d).transpose(0, 2, 1, 3, 4), dtype)  # noqa: E731

            def cva_einsum(q, k, v):
                logits = jnp.einsum("bfnhd,bgnhd->bnhfg", q, k, preferred_element_type=jnp.float32) * d ** -0.5
                w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
                return jnp.einsum("bnhfg,bgnhd->bfnhd", w, v)
            back = lambda o: np.asarray(o, np.float32).transpose(0, 2, 1, 3, 4).reshape(b, lq, H, d)  # noqa: E731
            runs.append(_compile(name, "einsum (B,F,N) form", cva_einsum, tuple(to_bfn(x) for x in (q, k, v)), ref,
                                 post=back))
        _round_robin(runs, repeats, torch)
        case_rows = [r for r, _ in runs]
        torch_ms = case_rows[0]["ms"] if torch is not None else None
        for r in case_rows:
            if torch_ms:
                r["vs_torch"] = round(r["ms"] / torch_ms, 2)
        rows.extend(case_rows)
        print(table([r for r in rows if r["case"] == name], ["case", "impl", "ms", "median_ms", "vs_torch",
                                                              "temp_mib", "max_abs_diff", "note"]), flush=True)
        print(f"  ({what}; B={b}, Lq={lq}, Lk={lk}, H={H}, D={d}, {a.dtype}; min of {repeats} round-robin runs)\n",
              flush=True)

    write_result(f"attention_{backend}", {"benchmark": "attention", "machine": machine_info(), "dtype": a.dtype,
                                          "heads": H, "cases": {n: CASES[n] for n in a.cases.split(",")}, "rows": rows},
                 a.out)
    return 0


def _compile(case, label, fn, args, ref, post=np.asarray):
    """(row with XLA temp memory and the max abs difference to PyTorch's output, the compiled call)."""
    import jax
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    row = {"case": case, "impl": label, "temp_mib": None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1)}
    if ref is not None:
        row["max_abs_diff"] = float(np.abs(np.asarray(post(compiled(*args)), np.float32) - ref).max())
    return row, lambda: compiled(*args)


def _round_robin(runs, repeats, torch):
    """One warm-up, then `repeats` rounds each timing every candidate once, so that load from other processes
    falls on all candidates alike; each row gets the min and the median of its times (ms)."""
    import contextlib
    times = [[] for _ in runs]
    ctx = torch.inference_mode() if torch is not None else contextlib.nullcontext()
    with ctx:
        for i in range(repeats + 1):
            for j, (_, fn) in enumerate(runs):
                t = timed(fn)[0]
                if i:
                    times[j].append(t * 1e3)
    for (row, _), ts in zip(runs, times):
        row["ms"], row["median_ms"] = min(ts), float(np.median(ts))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())
