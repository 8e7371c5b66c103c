"""One training step (`imagpose_jax.train`): step time, examples/s, model FLOPs per step and, on an
accelerator, the fraction of the devices' peak (MFU).

  python -m benchmarks.train_step --size tiny
  python -m benchmarks.train_step --size full --views 128 --batch 1 --steps 2    # SD1.5 size, small views (CPU)
  python -m benchmarks.train_step --size full --stage 2                           # the config's 512x512, bf16 (GPU/TPU)

The state and the step are the trainer's own (`configs/stageN.py[:tiny]`, `state_builder`, `init_train_state`,
`TrainStep`) on a mesh of all local devices; the batch is random data of the config's shapes (view size and
global batch overridable). Compute dtype, remat and the rest are the config's (the "full" variant computes in
bf16 with per-block remat) unless --dtype / --remat override them.

Model FLOPs per step come from XLA's cost analysis of the same step lowered with the "einsum" attention and
without remat: every attention is then a plain dot (cuDNN / splash custom calls and the chunked kernel's loop
are invisible to the cost analysis) and recomputation is not counted, i.e. the FLOPs the model needs, not
what the rematerialised program executes. MFU = FLOPs / step time / (devices x datasheet peak for the compute
dtype, `benchmarks.common.PEAK_FLOPS`); "n/a" on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import numpy as np

from imagpose_jax.testing import random_batch
from benchmarks.common import (machine_info, peak_flops, peak_memory, reset_peak_rss, rss_gib, table, timed,
                               write_result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("tiny", "full"))
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--views", type=int, help="view size (default: the config's, 64 tiny / 512 full)")
    p.add_argument("--batch", type=int, help="global batch (default: the config's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's)")
    p.add_argument("--remat", choices=("none", "block"), help="the UNet's per-block remat (default: the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it traces the step once more)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/train_step_<backend>_<size>.json)")
    a = p.parse_args(argv)

    import jax
    from flax import nnx

    from imagpose_jax.sharding import batch_sharding, make_mesh
    from imagpose_jax.train import config as tc
    from imagpose_jax.train.state import init_train_state

    c = tc.load_config(str(ROOT / "configs" / f"stage{a.stage}.py") + (":tiny" if a.size == "tiny" else ""))
    if a.views:
        c.data.height = c.data.width = a.views
    if a.batch:
        c.data.batch_size = a.batch
    if a.dtype:
        c.step.compute_dtype = a.dtype
    if a.remat:
        c.unet.remat = a.remat
    n_dev = jax.device_count()
    if c.data.batch_size % n_dev:
        c.data.batch_size = max(n_dev, c.data.batch_size // n_dev * n_dev)
    b, hgt, wid = c.data.batch_size, c.data.height, c.data.width
    mesh = make_mesh(devices=jax.devices())

    reset_peak_rss()
    init_s, (graphdef, state, shardings) = timed(lambda: init_train_state(tc.state_builder(c), mesh))
    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"state built in {init_s:.1f}s ({n_params / 1e9:.3f} B numbers incl. optimizer state), "
          f"RSS {rss_gib():.1f} GiB", flush=True)
    scfg = tc.step_config(c)
    step = tc.train_step(c, graphdef, shardings)
    batch = jax.device_put(random_batch(b, hgt, wid), batch_sharding(mesh))

    flops = None
    if not a.no_flops:  # model FLOPs: einsum attention (plain dots), no remat; lowering only, nothing runs
        plain = c.copy_and_resolve_references()
        plain.unet.remat = "none"   # same parameters and state; the forward counted once
        counting = tc.train_step(c, nnx.graphdef(nnx.eval_shape(tc.state_builder(plain))))
        old = os.environ.get("IMAGPOSE_ATTN_IMPL")
        os.environ["IMAGPOSE_ATTN_IMPL"] = "einsum"
        try:
            lower_s, lowered = timed(lambda: jax.jit(lambda s, x: counting(s, x)).lower(state, batch))
            cost = lowered.cost_analysis()
            flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        finally:
            if old is None:
                os.environ.pop("IMAGPOSE_ATTN_IMPL")
            else:
                os.environ["IMAGPOSE_ATTN_IMPL"] = old
        print(f"model FLOPs per step: {flops:.4g} (lowered in {lower_s:.1f}s)", flush=True)

    reset_peak_rss()
    first_s, (state, metrics) = timed(lambda: step(state, batch))
    times = []
    for _ in range(a.steps):
        t, (state, metrics) = timed(lambda: step(state, batch))
        times.append(t)
    loss = float(metrics["loss"])
    step_s = min(times) if times else first_s
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, scfg.compute_dtype) if jax.default_backend() != "cpu" else None
    row = {"size": a.size, "stage": a.stage, "views": f"{hgt}x{wid}", "batch": b, "dtype": scfg.compute_dtype,
           "remat": c.unet.remat, "compile_s": first_s - step_s, "first_step_s": first_s, "step_s": step_s,
           "median_step_s": float(np.median(times)) if times else None, "examples_per_s": b / step_s,
           "model_flops_per_step": flops, "achieved_tflops": None if flops is None else flops / step_s / 1e12,
           "mfu": "n/a on CPU" if jax.default_backend() == "cpu" else
           (None if flops is None or peak is None else flops / step_s / (peak * n_dev)),
           "loss": loss, "traces": step.traces, **peak_memory(), "state_numbers": n_params, "init_s": init_s,
           "times_s": [round(t, 4) for t in times]}
    cols = ["size", "stage", "views", "batch", "dtype", "remat", "compile_s", "step_s", "examples_per_s",
            "model_flops_per_step", "achieved_tflops", "mfu", "peak_rss_gib", "device_peak_gib"]
    print("\n" + table([row], cols))
    write_result(f"train_step_{jax.default_backend()}_{a.size}", {"benchmark": "train_step", **row,
                                                                   "devices": n_dev, "device_kind": kind,
                                                                   "peak_flops_per_device": peak,
                                                                   "unet_config": c.unet.to_dict(),
                                                                   "machine": machine_info()}, a.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())
