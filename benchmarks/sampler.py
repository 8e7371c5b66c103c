"""The sampler at SD1.5 size with CVA (random weights): compile time, time per denoising step and per image,
peak memory, and the loop's per-step overhead over the bare UNet call.

  python -m benchmarks.sampler --views 256                  # 2x2 grid of 256x256 views, 1 and 3 steps
  python -m benchmarks.sampler --views 512 --steps 1 --repeats 1
  python -m benchmarks.sampler --views 256 --dtype float32,bfloat16   # both dtypes, timed side by side
  python -m benchmarks.sampler --views 256 --dtype bfloat16 --steps 1,10   # on an accelerator

What is timed (guidance on, so every UNet call has batch 2 x --batch):
- the bare UNet: the same UNet call the loop makes (sample, timestep, [uncond | cond] context, pose features),
  jitted alone; compile separate from run;
- the whole sampler (`imagpose_jax.sampling.Sampler`: VAE encode, DINOv2, pose guider, the DDIM loop with
  classifier-free guidance, VAE decode; one XLA program) for each N in --steps: first call (trace + compile +
  run), then all programs are timed round-robin, --repeats rounds, so that load from other processes falls on
  all of them alike (min kept; the process CPU time of that run is recorded too). time(N) = fixed + N x step: the per-step time is the slope between the
  smallest and largest N, the fixed part (encoders, decoder, transfers) the intercept, and the per-step
  overhead is step / bare UNet - 1. Projected time per grid at 30 steps = fixed + 30 x step.
Peak memory: the process's peak RSS per phase on the CPU; the device's peak bytes in use on an accelerator.
--dtype (a comma-separated list: each dtype's models, bare UNet and samplers, all in the one round-robin): the
models are built in it, weights and compute, as `IMAGPosePipeline.from_pretrained(..., dtype=)` loads them
(`imagpose_jax.models.layers`); the sampler's latents and scheduler stay float32.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from imagpose_jax.testing import random_batch
from benchmarks.common import (machine_info, materialize, param_count, peak_memory, reset_peak_rss, round_robin,
                               rss_gib, table, timed, write_result)


def build_models(size: str, dtype):
    """Random-weight IMAGPose (with CVA), VAE and DINOv2 at SD1.5 size (or tiny), built in `dtype` (the models'
    argument: None for float32), weights initialised straight into it."""
    from convert_weights.random_weights import model_sizes
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig

    cfg, vae_cfg, dino_cfg = model_sizes("tiny" if size == "tiny" else "sd15")
    return cfg, [materialize(lambda k: IMAGPose(cfg, rngs=k, dtype=dtype), 0),
                 materialize(lambda k: AutoencoderKL(VAEConfig.from_dict(vae_cfg), rngs=k, dtype=dtype), 1),
                 materialize(lambda k: Dinov2Model(Dinov2Config.from_dict(dino_cfg), rngs=k, dtype=dtype), 2)]


def programs(a, name: str, steps: list[int], batch) -> tuple[dict, dict, dict]:
    """The models in dtype `name`, its bare UNet call (compiled) and one sampler per step count (first call run):
    (rows, timed functions, info) keyed by program label."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from imagpose_jax.models.layers import parse_dtype
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig

    dtype = parse_dtype(name)
    tag = f"{name}: " if len(a.dtypes) > 1 else ""
    reset_peak_rss()
    (build_s, (cfg, (model, vae, dino))) = timed(lambda: build_models(a.size, dtype))
    info = {"params_denoiser": param_count(model), "params_vae": param_count(vae), "params_dino": param_count(dino),
            "build_s": build_s, "weights_rss_gib": round(rss_gib(), 2)}
    print(f"{tag}models built in {build_s:.1f}s: denoiser {info['params_denoiser'] / 1e9:.3f} B params "
          f"(VAE {info['params_vae'] / 1e6:.0f} M, DINOv2 {info['params_dino'] / 1e6:.0f} M), RSS {rss_gib():.1f} GiB",
          flush=True)
    h = 2 * a.views // 8
    cfg_b = 2 * a.batch if a.guidance > 1 else a.batch

    # -- the bare UNet call of one denoising step, on inputs in the UNet's dtype (as the sampler passes them) -----
    rng = np.random.default_rng(1)
    udt = dtype or jnp.float32
    info["context_tokens"] = ctx_len = _dino_tokens(dino) + jax.eval_shape(
        lambda: model.patch(jnp.zeros((1, a.views // 8, a.views // 8, 4), udt))).shape[1]
    unet_args = (jnp.asarray(rng.standard_normal((cfg_b, h, h, 9)), udt), jnp.asarray(500, jnp.int32),
                 jnp.asarray(rng.standard_normal((cfg_b, ctx_len, cfg.embed_dim)), udt),
                 jnp.asarray(rng.standard_normal((cfg_b, h, h, cfg.unet.block_out_channels[0])), udt))
    graphdef, state = nnx.split(model.unet)
    unet_fn = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
    reset_peak_rss()
    compile_s, compiled = timed(lambda: unet_fn.lower(state, *unet_args).compile())
    first_s, _ = timed(lambda: compiled(state, *unet_args))
    label_u = f"{tag}bare UNet call (batch {cfg_b})"
    rows = {label_u: {"program": label_u, "dtype": name, "compile_s": compile_s, "first_call_s": first_s,
                      **peak_memory()}}
    fns = {label_u: lambda: compiled(state, *unet_args)}
    print(f"{label_u}: compiled in {compile_s:.1f}s, first call {first_s:.1f}s", flush=True)

    # -- the whole sampler at each step count: first call = trace + compile + run ------------------------------
    noise = np.random.default_rng(2).standard_normal((a.batch, h, h, 4)).astype(np.float32)
    info["samplers"] = {}
    for n in steps:
        sampler = Sampler(model, vae, dino, SamplerConfig(num_inference_steps=n, guidance_scale=a.guidance))
        label = f"{tag}sampler, {n} step{'s' * (n > 1)}"
        reset_peak_rss()
        first_s, images = timed(lambda: sampler(batch, noise=noise))
        assert images.shape == (a.batch, 2 * a.views, 2 * a.views, 3) and np.isfinite(images).all()
        rows[label] = {"program": label, "dtype": name, "first_call_s": first_s, **peak_memory()}
        fns[label] = lambda sampler=sampler: sampler(batch, noise=noise)
        info["samplers"][n] = (label, sampler)
        print(f"{label}: first call {first_s:.1f}s", flush=True)
    info["unet_label"] = label_u
    return rows, fns, info


def summarize(rows: dict, info: dict, steps: list[int], batch: int) -> dict:
    """Per-step time (the slope between the smallest and largest step count), fixed part, overhead over the bare
    UNet call and the projected time per image at 30 steps, from one dtype's timed rows."""
    unet = rows[info["unet_label"]]
    totals = {n: rows[label]["run_s"] for n, (label, _) in info["samplers"].items()}
    cpu_totals = {n: rows[label]["cpu_s"] for n, (label, _) in info["samplers"].items()}
    summary = {"unet_call_s": unet["run_s"], "unet_call_cpu_s": unet["cpu_s"]}
    if len(steps) > 1:
        lo, hi = steps[0], steps[-1]
        step_s = (totals[hi] - totals[lo]) / (hi - lo)
        step_cpu = (cpu_totals[hi] - cpu_totals[lo]) / (hi - lo)
        fixed_s = totals[lo] - lo * step_s
        summary.update(step_s=step_s, fixed_s=fixed_s, overhead_vs_unet=step_s / unet["run_s"] - 1,
                       step_cpu_s=step_cpu, overhead_vs_unet_cpu=step_cpu / unet["cpu_s"] - 1,
                       per_grid_30_steps_s=fixed_s + 30 * step_s, time_hi_over_time_lo=totals[hi] / totals[lo])
    else:  # one step count: the fixed part cannot be separated; assume it is what the bare UNet does not do
        n = steps[0]
        summary.update(fixed_s_assuming_no_overhead=totals[n] - n * unet["run_s"],
                       per_grid_30_steps_s_assuming_no_overhead=totals[n] + (30 - n) * unet["run_s"])
    summary["per_image_30_steps_s"] = summary.get("per_grid_30_steps_s",
                                                   summary.get("per_grid_30_steps_s_assuming_no_overhead")) / batch
    return summary


def main(argv=None) -> int:
    from imagpose_jax.models.layers import DTYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=256, help="view size in pixels (multiple of 64); the grid is 2x2")
    p.add_argument("--batch", type=int, default=1, help="grids per sampler call")
    p.add_argument("--steps", default="1,3", help="comma-separated step counts to time the whole sampler at")
    p.add_argument("--repeats", type=int, default=2, help="round-robin rounds timing every program once")
    p.add_argument("--dtype", default="float32",
                   help=f"comma-separated model dtypes, timed side by side: {', '.join(DTYPES)}")
    p.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: smoke-test the script")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--out", help="result JSON (default benchmarks/results/sampler_<backend>_<views>[_<dtypes>].json)")
    a = p.parse_args(argv)
    a.dtypes = list(dict.fromkeys(a.dtype.split(",")))
    unknown = [d for d in a.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown --dtype {', '.join(unknown)}; choose from {', '.join(DTYPES)}")

    import jax

    steps = sorted({int(s) for s in a.steps.split(",")})
    batch = random_batch(a.batch, a.views, a.views)
    rows, fns, infos = {}, {}, {}
    for name in a.dtypes:
        r, f, infos[name] = programs(a, name, steps, batch)
        rows.update(r)
        fns.update(f)

    # -- all programs round-robin, so that load from other processes falls on them alike ------------------------
    times = round_robin(fns, a.repeats)
    for label, r in times.items():
        rows[label].update(run_s=r["min_s"], median_s=r["median_s"], cpu_s=r["cpu_s"], times_s=r["times_s"])
    summaries = {}
    for name, info in infos.items():
        for label, sampler in info["samplers"].values():
            rows[label].update(compile_s=rows[label]["first_call_s"] - rows[label]["run_s"], traces=sampler.traces)
        summaries[name] = summarize(rows, info, steps, a.batch)
    rows = list(rows.values())

    h = 2 * a.views // 8
    ctx_len = infos[a.dtypes[0]]["context_tokens"]
    cols = ["program", "compile_s", "first_call_s", "run_s", "median_s", "cpu_s", "traces", "peak_rss_gib",
            "device_peak_gib"]
    print("\n" + table(rows, cols))
    for name, summary in summaries.items():
        print(f"\n{name}:\n" + "\n".join(f"  {k}: {v:.4g}" for k, v in summary.items()))
    print(f"\n({a.size} size, {a.dtype}, 2x2 grid of {a.views}x{a.views} views = {h}x{h} latents, {a.batch} grid(s) "
          f"per call, guidance {a.guidance}, context {ctx_len} tokens; min of {a.repeats} round-robin runs)")
    models = {name: {k: v for k, v in info.items() if k not in ("samplers", "unet_label", "context_tokens")}
              for name, info in infos.items()}
    result = {"benchmark": "sampler", "size": a.size, "views": a.views, "batch": a.batch, "dtype": a.dtype,
              "guidance": a.guidance, "steps": steps, "context_tokens": ctx_len, "models": models,
              "summaries": summaries, "rows": rows, "machine": machine_info()}
    suffix = ("" if a.dtypes == ["float32"] else "_" + "_".join(a.dtypes)) + ("_tiny" if a.size == "tiny" else "")
    write_result(f"sampler_{jax.default_backend()}_{a.views}{suffix}", result, a.out)
    return 0


def _dino_tokens(dino) -> int:
    """DINOv2's token count at 224x224 input (CLS + patches)."""
    import jax
    import jax.numpy as jnp
    return jax.eval_shape(lambda: dino(jnp.zeros((1, 224, 224, 3)))).shape[1]


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())
