"""`imagpose aot`: compile the real train step and the sampler for a Cloud TPU topology on this (CPU-only) machine
and report what they need per chip, before any pod is rented.

  imagpose aot --config configs/stage3.py --topology v5e:4x4 [--slices N] [--program train|sampler|both]
      [--plan_only] [--json report.json] [--config.KEY=VALUE ...]

The program is the one `imagpose train` runs: the same config and overrides, `load_config` -> `state_builder` ->
`abstract_train_state` (partition rules, mesh from the config) -> `TrainStep` (remat, dtypes, donation) ->
`TrainStep.lower(state spec, batch spec).compile()`, with the devices of the topology (`jax.experimental.topologies`,
the `libtpu` wheel of the `tpu-aot` extra). XLA's memory analysis gives the per-chip bytes and the cost analysis the
FLOPs; a program over the chip's HBM is an error naming the bytes needed and available. The sampler is
`Sampler.lower` for the config's models and views (`train.sample_steps` steps at `train.sample_guidance`), one
grid per chip, the weights replicated.

`--plan_only` (train step) stops after XLA's HLO passes: the per-chip memory plan (buffer assignment) of the
optimised TPU program, with its kernels, without the TPU back end's code emission, which for SD1.5 stage 3 at
512x512 views on v5e-16 took 50 min and 21.2 GiB of host memory (the plan: 6 min and 8 GiB); its FLOPs are
estimated from the step lowered for the CPU (`step_flops_estimate`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16_flops: float   # per chip, dense
    chip_config: str | None = None   # topologies' chip_config_name (v4 / v5p: "megacore")


# Cloud TPU's published per-chip figures.
CHIPS = {"v4": Chip(32 * GIB, 275e12, "megacore"), "v5e": Chip(16 * GIB, 197e12), "v5litepod": Chip(16 * GIB, 197e12),
         "v5p": Chip(95 * GIB, 459e12, "megacore"), "v6e": Chip(32 * GIB, 918e12)}


class DoesNotFit(RuntimeError):
    """The compiled program needs more HBM per chip than the chip has."""


def topology_devices(topology: str, slices: int = 1):
    """'v5e:4x4' -> the TPU devices of that slice (`slices` of them: a multi-slice topology), and the chip."""
    import os
    from jax.experimental import topologies
    # Only compiling: no TPU is opened, so another process holding libtpu's lock (another compile) is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kind = topology.partition(":")[0]
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation {kind!r} in {topology!r}; known: {sorted(CHIPS)}")
    chip = CHIPS[kind]
    kw = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices, **kw)
    except Exception as err:   # noqa: BLE001 - libtpu's errors name the problem; re-raised with the topology
        raise ValueError(f"cannot describe TPU topology {topology!r} ({slices} slice(s)): {err} (is the libtpu wheel "
                         f"installed? pip install -e '.[tpu-aot]')") from err
    return list(topo.devices), chip


def _bytes(tree) -> int:
    import jax
    import numpy as np
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _compile(lowered, chip: Chip, what: str, compiler_options=None):
    """lowered.compile() -> (compiled, memory analysis, cost analysis); an HBM overflow that XLA finds while
    compiling is `DoesNotFit`."""
    try:
        compiled = lowered.compile(compiler_options=compiler_options)
    except Exception as err:   # noqa: BLE001 - XLA reports an HBM overflow at compile time
        if "RESOURCE_EXHAUSTED" in str(err) or "exceed" in str(err).lower():
            raise DoesNotFit(f"XLA: {what} does not fit in {chip.hbm_bytes / GIB:.2f} GiB per chip: "
                             f"{str(err).splitlines()[0][:600]}") from err
        raise
    cost = compiled.cost_analysis()
    return compiled, compiled.memory_analysis(), cost[0] if isinstance(cost, (list, tuple)) else cost


def _peak(mem) -> int:
    return int(getattr(mem, "peak_memory_in_bytes", 0) or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                           - mem.alias_size_in_bytes + mem.temp_size_in_bytes))


TPU_KERNEL = 'custom_call_target="tpu_custom_call"'   # a Mosaic (Pallas) kernel in optimised HLO text


def _tpu_kernels(hlo_text: str) -> int:
    """Mosaic (Pallas) kernels in a TPU program's optimised HLO, e.g. splash attention."""
    return hlo_text.count(TPU_KERNEL)


def _at_peak(flops: float, chip: Chip, n: int) -> tuple[float | None, float | None, float | None]:
    """(seconds per program run at the chip's peak FLOP/s, examples/s at 100% MFU, at 40%) for `n` examples per
    run over the slice; Nones without FLOPs."""
    s = flops / chip.peak_bf16_flops if flops else None
    return (s, n / s, 0.4 * n / s) if s else (None, None, None)


def _lower_train_step(c, devices):
    """The train step of config `c` lowered for `devices`, and the report's parts known before compiling."""
    from flax import nnx

    from imagpose_jax.data.batch import batch_spec
    from imagpose_jax.sharding import batch_sharding, make_mesh
    from imagpose_jax.train import config as tc
    from imagpose_jax.train.state import abstract_train_state

    mesh = make_mesh(**c.mesh.to_dict(), devices=devices)
    graphdef, state, shardings = abstract_train_state(tc.state_builder(c), mesh)
    step = tc.train_step(c, graphdef, shardings)
    d = c.data
    if d.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"data.batch_size {d.batch_size} does not split over the mesh's data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']} batch shards")
    batch = batch_spec(d.batch_size, d.height, d.width, sharding=batch_sharding(mesh))
    ts = nnx.State(state) if not isinstance(state, nnx.State) else state
    report = {
        "program": "train step", "devices": len(devices), "mesh": dict(mesh.shape), "batch_size": d.batch_size,
        "views": f"{d.height}x{d.width}",
        "per_chip": {"params_bytes": _bytes(nnx.filter_state(ts["model"], nnx.Param)),
                     "frozen_encoders_bytes": _bytes(ts["vae"]) + _bytes(ts["dino"]),
                     "optimizer_bytes": _bytes(ts["optimizer"]) + (_bytes(ts["ema"]) if ts.get("ema") is not None
                                                                   else 0),
                     "batch_bytes": _bytes(batch)},
        "remat": tc.model_config(c).unet.remat, "compute_dtype": c.step.compute_dtype,
    }
    return step.lower(state, batch), report


def compile_train_step(c, devices, chip: Chip, *, on_compiled=None, compiler_options=None) -> dict:
    """The train step of config `c` compiled for `devices` -> a per-chip report (bytes, FLOPs, step time at peak);
    `check_fits` then compares it with the chip's HBM. An HBM overflow XLA finds while compiling is `DoesNotFit`.
    `on_compiled(compiled)` is called with the compiled program (e.g. to read its HLO); `compiler_options` go to
    XLA (e.g. `xla_dump_to`)."""
    lowered, report = _lower_train_step(c, devices)
    compiled, mem, cost = _compile(lowered, chip, "the train step", compiler_options)
    if on_compiled is not None:
        on_compiled(compiled)
    flops = float(cost.get("flops", 0.0))
    step_s, at_100, at_40 = _at_peak(flops, chip, c.data.batch_size)
    report["per_chip"].update(argument_bytes=int(mem.argument_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                              peak_bytes=_peak(mem), hbm_bytes=chip.hbm_bytes, flops=flops, step_s_at_peak=step_s)
    report.update(examples_per_s_at_100_mfu=at_100, examples_per_s_at_40_mfu=at_40,
                  tpu_custom_calls=_tpu_kernels(compiled.as_text()))
    return report


# -- the memory plan only: XLA's buffer assignment, without the TPU back end's code emission ---------------------

def buffer_assignment_bytes(text: str) -> dict:
    """XLA's buffer assignment of a program (`*after_optimizations-buffer-assignment.txt`, written by `xla_dump_to`
    after the HLO optimisations and before code emission) -> HBM bytes per chip (memory color 0; the other colors
    are on-chip memories): `argument_bytes` (the parameters, donated outputs included), `output_bytes` (outputs
    not aliased to a parameter), `temp_bytes` (XLA's preallocated heap), `thread_local_bytes`, `constant_bytes`,
    and `planned_bytes`, their sum."""
    import re
    kinds = {"argument_bytes": 0, "output_bytes": 0, "temp_bytes": 0, "thread_local_bytes": 0, "constant_bytes": 0}
    seen = False
    for m in re.finditer(r"^allocation \d+: size (\d+)(.*?):?$", text, re.M):
        seen = True
        size, attrs = int(m.group(1)), m.group(2)
        if re.search(r"\bcolor [1-9]", attrs):
            continue
        kind = ("argument_bytes" if "parameter" in attrs else "thread_local_bytes" if "thread-local" in attrs
                else "constant_bytes" if "constant" in attrs else "temp_bytes" if "preallocated-temp" in attrs
                else "output_bytes" if "live-out" in attrs or "output" in attrs else None)
        if kind is None:
            raise ValueError(f"buffer assignment: unknown allocation kind {attrs.strip()[:200]!r}")
        kinds[kind] += size
    if not seen:
        raise ValueError("buffer assignment: no allocations found (not an XLA buffer-assignment dump?)")
    kinds["planned_bytes"] = sum(kinds.values())
    return kinds


def step_flops_estimate(c, per_chip_batch: int) -> float:
    """FLOPs of config `c`'s train step for `per_chip_batch` examples: XLA's cost analysis of the same step
    (`_lower_train_step`) lowered for one CPU device, with dense XLA attention everywhere (`IMAGPOSE_ATTN_IMPL`,
    set while tracing: the CPU's chunked kernel is a loop whose body XLA counts once, and the TPU program's splash
    kernels are not counted by XLA) and the per-block rematerialisation's recomputation included. The tiny stage-2
    step at one example per chip: 3.92e9 against 4.19e9 in the compiled v5e program."""
    import os

    import jax

    from imagpose_jax.models.attention import ENV_VAR
    one = c.copy_and_resolve_references()
    one.data.batch_size = per_chip_batch
    one.mesh.update(data=-1, fsdp=1, tensor=1)
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "xla"
    try:
        lowered, _ = _lower_train_step(one, jax.devices("cpu")[:1])
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before
    return float(lowered.cost_analysis()["flops"])


def _plan_child(c, topology: str, slices: int, dump: str) -> None:
    """In a child process: lower the train step, estimate its FLOPs, write the report's known parts, compile with
    the HLO dumped (the parent stops this process once the buffer assignment is written)."""
    import os
    devices, _ = topology_devices(topology, slices)
    try:
        lowered, report = _lower_train_step(c, devices)
        mesh = report["mesh"]
        report["per_chip"]["flops"] = step_flops_estimate(c, c.data.batch_size // (mesh["data"] * mesh["fsdp"]))
        with open(os.path.join(dump, "report.json.tmp"), "w") as f:
            json.dump(report, f)
        os.replace(os.path.join(dump, "report.json.tmp"), os.path.join(dump, "report.json"))
        lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
    except Exception as err:   # noqa: BLE001 - handed to the parent, which raises it with its message
        with open(os.path.join(dump, "error.txt"), "w") as f:
            f.write(f"{type(err).__name__}: {err}")


def plan_train_step(c, topology: str, slices: int = 1, *, timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> dict:
    """The train step's memory plan on a TPU topology without its code emission: XLA's buffer assignment of the
    optimised per-chip program (every HLO pass, sharding, fusion and rematerialisation done; an HBM overflow found
    there is `DoesNotFit`), read as soon as XLA writes it; the compile, in a child process, is then stopped. For
    programs whose code emission needs more host memory or time than there is (SD1.5 stage 3 at 512x512 views on
    v5e-16: 21.2 GiB and 50 min; its plan: 7.7 GiB and 6 min, peak 8.40 GiB against the compiled 7.71 GiB).
    The report is `compile_train_step`'s with `planned_bytes` (arguments + outputs + XLA's heap + thread-local +
    constants) as its peak and the FLOPs of `step_flops_estimate`; the TPU back end adds scratch of its own in code
    emission (tiny stage-2 program on v5e 2x2: final temporaries 78.8 MB against a 66.3 MB heap)."""
    import glob
    import multiprocessing
    import os
    import shutil
    import tempfile
    import time

    _, chip = topology_devices(topology, slices)
    dump = tempfile.mkdtemp(prefix="imagpose-aot-plan-")
    child = multiprocessing.get_context("spawn").Process(target=_plan_child, args=(c, topology, slices, dump),
                                                         daemon=True)
    child.start()
    try:
        sizes, steady, deadline = None, 0, time.monotonic() + timeout_s
        while True:
            time.sleep(poll_s)
            if os.path.exists(os.path.join(dump, "error.txt")) or not child.is_alive():
                child.join(5)
                err = open(os.path.join(dump, "error.txt")).read() if os.path.exists(
                    os.path.join(dump, "error.txt")) else (f"the compiling process exited with code {child.exitcode}"
                                                           + (" (killed: out of host memory?)"
                                                              if child.exitcode == -9 else ""))
                if "RESOURCE_EXHAUSTED" in err or "exceed" in err.lower():
                    raise DoesNotFit(f"XLA: the train step does not fit in {chip.hbm_bytes / GIB:.2f} GiB per chip: "
                                     f"{err.splitlines()[0][:600]}")
                raise RuntimeError(f"imagpose aot: planning the train step failed: {err[:2000]}")
            files = [glob.glob(os.path.join(dump, f"*jit__step*after_optimizations{end}.txt"))
                     for end in ("-buffer-assignment", "")]   # [[buffer assignment], [optimised HLO]] once written
            now = [os.path.getsize(f) for found in files for f in found]
            steady = steady + 1 if now == sizes else 0   # written out: the sizes unchanged over two polls
            if len(now) == 2 and os.path.exists(os.path.join(dump, "report.json")) and steady >= 2:
                break
            sizes = now
            if time.monotonic() > deadline:
                raise TimeoutError(f"imagpose aot: no buffer assignment after {timeout_s:.0f} s")
        child.kill()
        [ba], [hlo] = files
        with open(os.path.join(dump, "report.json")) as f:
            report = json.load(f)
        with open(ba) as f:
            plan = buffer_assignment_bytes(f.read())
        with open(hlo) as f:
            kernels = _tpu_kernels(f.read())
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
        shutil.rmtree(dump, ignore_errors=True)
    step_s, at_100, at_40 = _at_peak(report["per_chip"]["flops"], chip, c.data.batch_size)
    report["per_chip"].update(argument_bytes=plan["argument_bytes"], temp_bytes=plan["temp_bytes"],
                              peak_bytes=plan["planned_bytes"], hbm_bytes=chip.hbm_bytes, step_s_at_peak=step_s,
                              plan=plan, flops_estimated=True)
    report.update(plan_only=True, examples_per_s_at_100_mfu=at_100, examples_per_s_at_40_mfu=at_40,
                  tpu_custom_calls=kernels)
    return report


def compile_sampler(c, devices, chip: Chip, *, batch_size: int | None = None, steps: int | None = None,
                    guidance: float | None = None) -> dict:
    """The sampler (`sampling.sampler.Sampler`: encode, `steps` denoising steps with guidance, decode; one
    program) for config `c`'s models and views, compiled for `devices` with the batch of `batch_size` grids
    (default: one per chip) split over all of them and the weights replicated -> a per-chip report like
    `compile_train_step`'s (no optimizer; FLOPs and time per batch)."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from imagpose_jax.data.batch import batch_spec
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    from imagpose_jax.sharding import make_mesh
    from imagpose_jax.train import config as tc
    import jax

    mesh = make_mesh(data=-1, devices=devices)
    b = batch_size or len(devices)
    if b % len(devices):
        raise ValueError(f"the sampler's batch {b} does not split over {len(devices)} chips")
    built = nnx.eval_shape(tc.state_builder(c))
    cfg = SamplerConfig(num_inference_steps=steps or c.train.sample_steps,
                        guidance_scale=c.train.sample_guidance if guidance is None else guidance)
    sampler = Sampler(built.model, built.vae, built.dino, cfg, mesh=mesh)
    d, split = c.data, NamedSharding(mesh, P(tuple(mesh.axis_names)))
    batch = batch_spec(b, d.height, d.width, sharding=split)
    noise = jax.ShapeDtypeStruct((b, *sampler.latent_shape(2 * d.height, 2 * d.width)), jax.numpy.float32,
                                 sharding=split)
    compiled, mem, cost = _compile(sampler.lower(batch, noise), chip, "the sampler")
    flops = float(cost.get("flops", 0.0))
    batch_s, at_100, at_40 = _at_peak(flops, chip, b)
    weights = _bytes(nnx.state(built.model, nnx.Param)) + _bytes(built.vae) + _bytes(built.dino)
    return {
        "program": "sampler", "devices": len(devices), "mesh": dict(mesh.shape), "batch_size": b,
        "views": f"{d.height}x{d.width}", "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale,
        "per_chip": {"weights_bytes": weights, "batch_bytes": _bytes(batch) + _bytes(noise),
                     "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
                     "peak_bytes": _peak(mem), "hbm_bytes": chip.hbm_bytes, "flops": flops,
                     "batch_s_at_peak": batch_s},
        "grids_per_s_at_100_mfu": at_100, "grids_per_s_at_40_mfu": at_40,
        "tpu_custom_calls": _tpu_kernels(compiled.as_text()),
    }


def check_fits(report: dict) -> None:
    """DoesNotFit naming the bytes needed and available when the report's peak exceeds the chip's HBM."""
    p = report["per_chip"]
    if p["peak_bytes"] > p["hbm_bytes"]:
        raise DoesNotFit(f"{report.get('program', 'the train step')} needs {p['peak_bytes'] / GIB:.2f} GiB per chip, the chip has "
                         f"{p['hbm_bytes'] / GIB:.2f} GiB (short by {(p['peak_bytes'] - p['hbm_bytes']) / GIB:.2f} GiB): "
                         f"shard more (--config.mesh.fsdp), lower --config.data.batch_size"
                         + (" or set --config.unet.remat=block" if report.get("remat") not in (None, "block") else ""))


def format_report(r: dict) -> str:
    p = r["per_chip"]
    g = lambda b: f"{b / GIB:.3f} GiB"   # noqa: E731
    if r["program"] == "sampler":
        lines = [f"sampler: {r['devices']} chips, batch {r['batch_size']} grids of {r['views']} views, {r['steps']} steps, "
                 f"guidance {r['guidance']}",
                 f"per chip: weights {g(p['weights_bytes'])} (replicated), batch + noise {g(p['batch_bytes'])}"]
    else:
        lines = [f"train step: {r['devices']} chips, mesh {r['mesh']}, global batch {r['batch_size']} of {r['views']} "
                 f"views, {r['compute_dtype']}, remat {r['remat']}",
                 f"per chip: params {g(p['params_bytes'])}, frozen VAE + DINOv2 {g(p['frozen_encoders_bytes'])}, "
                 f"optimizer (+ EMA) {g(p['optimizer_bytes'])}, batch {g(p['batch_bytes'])}"]
    lines += [f"          temporaries {g(p['temp_bytes'])}, peak {g(p['peak_bytes'])} of {g(p['hbm_bytes'])} HBM",
              (f"FLOPs per chip {p['flops']:.3e} (Pallas kernels not counted)" if not p.get("flops_estimated") else
               f"memory plan only (XLA's buffer assignment, before code emission); FLOPs per chip {p['flops']:.3e} "
               f"(estimated: the step lowered for the CPU with dense attention)")
              + f"; TPU kernels {r['tpu_custom_calls']}"]
    t, unit = (p.get("step_s_at_peak"), "examples") if r["program"] != "sampler" else (p["batch_s_at_peak"], "grids")
    if t:
        rate = r[f"{unit}_per_s_at_100_mfu"]
        lines.append(f"{'step' if unit == 'examples' else 'batch'} time at peak {t * 1e3:.3g} ms: {rate:.2f} {unit}/s "
                     f"at 100% MFU, {0.4 * rate:.2f} at 40%")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from imagpose_jax.train.config import config_flag_values
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0

    def define(fv):
        flags.DEFINE_string("topology", None, "a Cloud TPU topology, e.g. v5e:4x4, v5p:2x2x1, v4:2x2x1", flag_values=fv)
        flags.DEFINE_integer("slices", 1, "number of slices (multi-slice)", flag_values=fv)
        flags.DEFINE_enum("program", "both", ["train", "sampler", "both"], "what to compile", flag_values=fv)
        flags.DEFINE_string("json", None, "also write the report(s) here", flag_values=fv)
        flags.DEFINE_bool("plan_only", False, "train step only: XLA's memory plan (buffer assignment) of the "
                          "optimised TPU program, without the back end's code emission (which needs more host "
                          "memory than XLA's passes; FLOPs then estimated from the step lowered for the CPU)", flag_values=fv)
    try:
        fv = config_flag_values(argv, define, prog="imagpose aot")
    except (flags.Error, FileNotFoundError, ValueError, AttributeError, KeyError) as err:
        raise SystemExit(f"imagpose aot: error: {err}") from None
    if fv.config is None or not fv.topology:
        raise SystemExit("imagpose aot: error: --config and --topology are required")
    if fv.plan_only and fv.program != "train":
        raise SystemExit("imagpose aot: error: --plan_only plans the train step: add --program train")
    devices, chip = topology_devices(fv.topology, fv.slices)
    compilers = {"train": compile_train_step, "sampler": compile_sampler}
    if fv.plan_only:
        compilers["train"] = lambda c, _devices, _chip: plan_train_step(c, fv.topology, fv.slices)
    reports = []
    for name in ("train", "sampler") if fv.program == "both" else (fv.program,):
        try:
            report = compilers[name](fv.config, devices, chip)
            check_fits(report)
        except DoesNotFit as err:
            raise SystemExit(f"imagpose aot: {fv.topology}: {err}") from None
        print(f"{fv.topology} ({fv.slices} slice(s)), stage {fv.config.get('stage')}: " + format_report(report),
              flush=True)
        reports.append({"topology": fv.topology, "slices": fv.slices, "stage": fv.config.get("stage"), **report})
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0
