"""Shared by the benchmark scripts: machine description, timing, peak memory, MFU peaks, result files."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Dense peak FLOP/s per device for MFU, by a substring of `device_kind` (first match wins, so longer names that
# contain shorter ones come first: L40S and L40 before L4): (bf16/fp16, fp32).
# Vendor datasheet figures without sparsity; fp32 on NVIDIA is the non-tensor-core rate (TF32 is not used:
# the project computes fp32 in full precision on GPU only when asked).
PEAK_FLOPS = (
    ("H200", 989e12, 67e12), ("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12), ("L40S", 362e12, 91.6e12), ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 30e12), ("A10G", 70e12, 31e12), ("V100", 125e12, 15.7e12),
    ("TPU v6", 918e12, 918e12 / 2), ("TPU v5p", 459e12, 459e12 / 2), ("TPU v5 lite", 197e12, 197e12 / 2),
    ("TPU v5e", 197e12, 197e12 / 2), ("TPU v4", 275e12, 275e12 / 2),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Datasheet peak for `device_kind` ("bfloat16"/"float16" or "float32"); None where unknown (the CPU)."""
    for key, half, full in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return half if dtype in ("bfloat16", "float16") else full
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The vector / matrix extensions that matter for XLA:CPU and PyTorch (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "hypervisor")
    return " ".join(x for x in wanted if x in flags)


def machine_info() -> dict:
    import jax
    info = {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "attn_impl_env": os.environ.get("IMAGPOSE_ATTN_IMPL", ""),
            "compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
            "load_avg_at_start": os.getloadavg()[0], "mem_total_gib": _mem_total_gib(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import flax
        info["flax"] = flax.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


# -- memory -----------------------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Resets the process's peak resident set (Linux `clear_refs` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_gib(field: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM, VmRSS) in GiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    """Peak resident set since start or the last `reset_peak_rss` (VmHWM), GiB."""
    peak = _proc_status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    rss = _proc_status_gib("VmRSS")
    return rss if rss is not None else float("nan")


def device_peak_gib() -> float | None:
    """The accelerator's peak bytes in use (None on the CPU, where `peak_rss_gib` is the measure)."""
    import jax
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / 2**30


def peak_memory() -> dict:
    dev = device_peak_gib()
    return {"peak_rss_gib": round(peak_rss_gib(), 2), **({"device_peak_gib": round(dev, 2)} if dev is not None else {})}


# -- timing -----------------------------------------------------------------------------------------------------

def block(x):
    import jax
    return jax.block_until_ready(x)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    t = os.times()
    return t.user + t.system


def round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Times every function once per round, `rounds` rounds, so that load from other processes falls on all of
    them alike. Per name: min / median wall time and the process CPU time of the fastest run (seconds)."""
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            block(fn())
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(cpu_seconds() - c0)
    out = {}
    for name in fns:
        i = min(range(rounds), key=walls[name].__getitem__)
        out[name] = {"min_s": walls[name][i], "median_s": statistics.median(walls[name]), "cpu_s": cpus[name][i],
                     "times_s": [round(t, 4) for t in walls[name]]}
    return out


# -- output -----------------------------------------------------------------------------------------------------

def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def write_result(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    print(f"\nwrote {path}")
    return path


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# -- models -----------------------------------------------------------------------------------------------------

def materialize(ctor, seed: int = 0):
    """`ctor(rngs)` with random weights, built abstractly then initialised in one jitted program (no eager
    per-parameter dispatch; `ParamKeys` instead of `nnx.Rngs`, see `imagpose_jax.models.init`)."""
    import jax
    from flax import nnx

    from imagpose_jax.models.init import ParamKeys, abstract
    graphdef, _ = nnx.split(abstract(ctor))
    state = jax.jit(lambda: nnx.split(ctor(ParamKeys(seed)))[1])()
    return nnx.merge(graphdef, state)


def param_count(module) -> int:
    import jax
    from flax import nnx
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
