"""Our SD1.5-size UNet against diffusers' `UNet2DConditionModel` on the same machine, same weights, same input.

  python -m benchmarks.unet_vs_torch                 # 2x2 grid of 256x256 views: 64x64 latents, batch 2
  python -m benchmarks.unet_vs_torch --views 512 --repeats 2

diffusers' UNet (SD1.5 settings, 9 input channels, its own random initialisation) is converted with
`convert_weights` into our stage-1 UNet, both run one forward pass on the same (B, 9, h, w) sample, timestep and
(B, N, 768) context (fp32; PyTorch with its default thread count, JAX with all cores) and the outputs are
compared (max abs diff). Our CVA UNet (stage 2/3: the same weights plus 21 random CVA modules) runs the same
input: its cost over the stage-1 UNet is the CVA's cost. Compile time is reported separately; the three models
are then timed round-robin (--repeats rounds, min kept, so that load from other processes falls on all alike),
with the process CPU time of the fastest run beside the wall time.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import (machine_info, param_count, peak_memory, reset_peak_rss, round_robin, table, timed,
                               write_result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, default=256, help="view size in pixels (the grid is 2x2 views)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with classifier-free guidance)")
    p.add_argument("--tokens", type=int, default=261, help="context tokens (257 DINOv2 + patch tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny UNets (channels 32/32/64/64), to smoke-test the script")
    p.add_argument("--out", help="result JSON (default benchmarks/results/unet_vs_torch_<backend>_<views>.json)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel
    from flax import nnx

    from convert_weights.imagpose import unet_from_sd15
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.unet import UNet
    from imagpose_jax.models.unet_config import UNetConfig

    h = w = 2 * a.views // 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, 9, h, w)).astype(np.float32)
    size = dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=48) if a.tiny else {}
    ctx = rng.standard_normal((a.batch, a.tokens, size.get("cross_attention_dim", 768))).astype(np.float32)
    t = np.full((a.batch,), 500, np.int64)
    result = {"benchmark": "unet_vs_torch", "size": "tiny" if a.tiny else "sd15", "views": a.views, "latent_grid": [h, w], "batch": a.batch,
              "tokens": a.tokens, "dtype": "float32"}

    # -- diffusers, and ours with the same weights -------------------------------------------------------------
    reset_peak_rss()
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**{"in_channels": 9, "cross_attention_dim": 768, "sample_size": h, **size}).eval()
    tx, tt, tc = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def torch_call():
        with torch.inference_mode():
            return theirs(tx, tt, tc).sample
    cfg = UNetConfig(**size)
    stage1 = abstract(lambda k: UNet(cfg, rngs=k))
    nnx.update(stage1, unet_from_sd15(cfg, {k: v.detach().numpy() for k, v in theirs.state_dict().items()}))
    # the CVA UNet: the same weights plus random CVA modules (the stage-1 arrays are shared, not copied)
    cva = abstract(lambda k: UNet(cfg.replace(use_cva=True), rngs=k))
    known = dict(nnx.to_flat_state(nnx.state(stage1, nnx.Param)))
    rng = np.random.default_rng(1)
    nnx.update(cva, nnx.from_flat_state([
        (p, v.replace(known[p].get_value() if p in known else jnp.asarray(rng.standard_normal(v.shape, np.float32) * 0.02)))
        for p, v in nnx.to_flat_state(nnx.state(cva, nnx.Param))]))
    del known
    gc.collect()

    sample, tj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)
    programs, rows = {}, {}
    for label, model in (("ours stage-1 UNet (JAX)", stage1), ("ours CVA UNet (JAX)", cva)):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, x, t, c, graphdef=graphdef: nnx.merge(graphdef, state)(x, t, c))
        compile_s, compiled = timed(lambda: fn.lower(state, sample, tj, cj).compile())
        programs[label] = lambda compiled=compiled, state=state: compiled(state, sample, tj, cj)
        rows[label] = {"model": label, "params": param_count(model), "compile_s": compile_s}
    label_t = "diffusers UNet2DConditionModel (torch)"
    rows[label_t] = {"model": label_t, "params": sum(p.numel() for p in theirs.parameters())}
    fns = {label_t: torch_call, **programs}
    outs = {}
    for label, fn in fns.items():  # first calls (PyTorch's lazy set-up, our first run after compiling)
        rows[label]["first_call_s"], outs[label] = timed(fn)
    ref = outs[label_t].numpy()
    ours = np.asarray(outs["ours stage-1 UNet (JAX)"]).transpose(0, 3, 1, 2)
    del outs
    times = round_robin(fns, a.repeats)
    for label, r in times.items():
        rows[label].update(step_s=r["min_s"], median_s=r["median_s"], cpu_s=r["cpu_s"], times_s=r["times_s"])
    s1, tr = rows["ours stage-1 UNet (JAX)"], rows[label_t]
    s1["max_abs_diff_vs_torch"] = float(np.abs(ours - ref).max())
    s1["torch_over_ours"] = round(tr["step_s"] / s1["step_s"], 3)
    rows["ours CVA UNet (JAX)"]["cva_over_stage1"] = round(rows["ours CVA UNet (JAX)"]["step_s"] / s1["step_s"], 3)
    rows = [rows[label_t], rows["ours stage-1 UNet (JAX)"], rows["ours CVA UNet (JAX)"]]

    cols = ["model", "compile_s", "first_call_s", "step_s", "median_s", "cpu_s", "torch_over_ours",
            "max_abs_diff_vs_torch", "cva_over_stage1"]
    print("\n" + table(rows, cols))
    print(f"\n(B={a.batch}, latents {h}x{w}: a 2x2 grid of {a.views}x{a.views} views, context {a.tokens} tokens, fp32; "
          f"min of {a.repeats} round-robin runs; max |ref| {np.abs(ref).max():.3g}; process peak RSS "
          f"{peak_memory()['peak_rss_gib']} GiB with all three models)")
    result.update(machine=machine_info(), rows=rows, **peak_memory())
    write_result(f"unet_vs_torch_{jax.default_backend()}_{a.views}" + ("_tiny" if a.tiny else ""), result, a.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())
