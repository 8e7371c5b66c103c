"""Markdown tables from the result files, for the READMEs: `python -m benchmarks.report [results_dir]`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS


def _load(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) | {"_file": p.name} for p in sorted(folder.glob(pattern))]


def _ms(x) -> str:
    return x if isinstance(x, str) else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def machine_line(m: dict) -> str:
    return (f"{m.get('cpu', '?')} ({m.get('cpu_features', '')}), {m.get('cpu_cores')} cores, "
            f"{m.get('mem_total_gib')} GiB; {m.get('backend')} / {m.get('device_kind')}; jax {m.get('jax')}, "
            f"torch {m.get('torch', '-')}; load average {m.get('load_avg_at_start', 0):.1f} at start, {m.get('date')}")


def attention(r: dict) -> str:
    out = ["| case | PyTorch sdpa | auto (choice) | einsum | xla | chunked, best size | auto / PyTorch | chunked temp MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for case in r["cases"]:
        rows = [x for x in r["rows"] if x["case"] == case]
        get = lambda name: next((x for x in rows if x["impl"] == name), None)  # noqa: E731
        torch = get("torch sdpa")
        auto = next((x for x in rows if x["impl"].startswith("auto")), None)
        chunked = [x for x in rows if x["impl"].startswith("chunked") and not isinstance(x["ms"], str)]
        best = min(chunked, key=lambda x: x["ms"]) if chunked else None
        cell = lambda x: "-" if x is None else (x["ms"] if isinstance(x["ms"], str) else  # noqa: E731
                                                f"{_ms(x['ms'])} ({_ms(x['median_ms'])})")
        timed = lambda x: x is not None and not isinstance(x["ms"], str)  # noqa: E731 (absent or failed: "-")
        ratio = f"{auto['ms'] / torch['ms']:.2f}" if timed(auto) and timed(torch) else "-"
        choice = f" `{auto['impl'].split('-> ')[-1]}`" if auto else ""
        out.append(f"| {case} | {cell(torch)} | {cell(auto)}{choice} | {cell(get('einsum'))} | "
                   f"{cell(get('xla'))} | {cell(best)} `{best['impl'] if best else ''}` | "
                   f"{ratio} | {best['temp_mib'] if best else '-'} |")
    return "\n".join(out)


def unet(r: dict) -> str:
    out = ["| model | params | compile s | one forward, s: min (median) | CPU s | time / PyTorch's | "
           "time / stage-1's | max abs diff to PyTorch |", "|---|---|---|---|---|---|---|---|"]
    torch = r["rows"][0]["step_s"]
    stage1 = next(x["step_s"] for x in r["rows"] if "stage-1" in x["model"])
    for x in r["rows"]:
        diff = x.get("max_abs_diff_vs_torch")
        out.append(f"| {x['model']} | {x['params'] / 1e6:.0f} M | {x['compile_s']:.1f} | " if "compile_s" in x else
                   f"| {x['model']} | {x['params'] / 1e6:.0f} M | - | ")
        vs_stage1 = "-" if "torch" in x["model"] else f"{x['step_s'] / stage1:.2f}"
        out[-1] += (f"{x['step_s']:.2f} ({x['median_s']:.2f}) | {x['cpu_s']:.1f} | {x['step_s'] / torch:.2f} | "
                    f"{vs_stage1} | {'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(out)


def sampler(r: dict) -> str:
    summaries = r.get("summaries") or {r["dtype"]: r["summary"]}   # files of one dtype before --dtype took a list
    out = ["| program | compile s (samplers: first call − run) | first call s | run s, min (median) | CPU s | traces | peak GiB |",
           "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        out.append(f"| {x['program']} | {x.get('compile_s', 0):.1f} | {x['first_call_s']:.1f} | "
                   f"{x['run_s']:.2f} ({x['median_s']:.2f}) | {x['cpu_s']:.1f} | {x.get('traces', '')} | "
                   f"{x.get('device_peak_gib', x['peak_rss_gib'])} |")
    for name, s in summaries.items():
        out += ["", f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items())]
    return "\n".join(out)


def main(argv=None) -> int:
    folder = Path(argv[0] if argv else (sys.argv[1] if len(sys.argv) > 1 else RESULTS))
    for r in _load(folder, "attention_*.json"):
        print(f"### attention ({r['_file']}, {r['dtype']})\n\n{attention(r)}\n\n{machine_line(r['machine'])}\n")
    for r in _load(folder, "unet_vs_torch_*.json"):
        print(f"### UNet vs PyTorch ({r['_file']})\n\n{unet(r)}\n\n{machine_line(r['machine'])}\n")
    for r in _load(folder, "sampler_*.json"):
        print(f"### sampler ({r['_file']})\n\n{sampler(r)}\n\n{machine_line(r['machine'])}\n")
    for r in _load(folder, "train_step_*.json"):
        print(f"### train step ({r['_file']}): " + ", ".join(
            f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in (
                "size", "stage", "views", "batch", "dtype", "remat", "compile_s", "step_s", "examples_per_s",
                "model_flops_per_step", "achieved_tflops", "mfu", "peak_rss_gib")) + f"\n\n{machine_line(r['machine'])}\n")
    for r in _load(folder, "converter*.json"):
        print(f"### converter ({r['_file']})\n\n| conversion | input GiB | output GiB | seconds | peak RSS GiB |\n|---|---|---|---|---|")
        for x in r["rows"]:
            print(f"| {x['conversion']} ({x['size']}) | {x['input_gib']} | {x['output_gib']} | {x['seconds']:.1f} | "
                  f"{x['peak_rss_gib']:.2f} |")
        print(f"\n{machine_line(r['machine'])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
