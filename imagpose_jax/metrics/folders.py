"""`imagpose evaluate`: a folder of generated images scored against the folder of their targets with the
DeepFashion pose-transfer protocol of PIDM and PCDMs (their GFLA-derived metrics script):

- SSIM: `ssim`'s defaults, i.e. skimage's `structural_similarity(channel_axis=-1, data_range=1, win_size=51)`
  on the RGB images / 255;
- PSNR (dB, data range 1) and L1 (mean absolute difference of values in [0, 1]);
- LPIPS v0.1 per pair, with the AlexNet trunk those scripts use (`lpips.LPIPS(net='alex')`), given weights;
- FID of the generated set against the real training images (`fid_real_dir`: PIDM and PCDMs use the training
  set) or, without them, against the targets, given Inception weights. The output says which.

Pairs are matched by file name: `generated/NAME.png` is scored against `targets/NAME.jpg` (the extensions may
differ), or, for the pair names `imagpose test` writes (`FROM_2_TO_vis.png`, PIDM's/GFLA's; `FROM_to_TO.png`,
PCDMs'), against `targets/TO.jpg`, found as those papers' metric scripts find it (the part after the last `_2_`
and before `_vis`; after the last `_to_`). Every generated image needs its target; with plain names every target
also needs its generated image (with pair names the targets folder may be the whole test folder, sources
included). A pair's two images must have one size, and all pairs the same one (the protocol's is 256x176: resize
beforehand).

Memory stays bounded: pairs stream in fixed-size batches (the last one padded by repetition, so one compiled
program serves them all), each batch read by a thread pool while the previous one is measured; only the (N,)
per-pair values and the (N, 2048) Inception features accumulate.

`write_reports` writes `metrics.json` (strict JSON: `n`, the means, the per-pair values in `pairs`, the FID
reference; a PSNR of +inf, from identical images, is written as null, as is a metric not computed) and
`metrics.md` (the papers' DeepFashion table: SSIM, LPIPS, FID, PSNR, L1; "–" where not computed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from imagpose_jax.data.index import IMAGE_EXTENSIONS
from imagpose_jax.metrics.evaluate import pair_metrics
from imagpose_jax.metrics.fid import InceptionV3, fid_from_features, inception_features, load_inception
from imagpose_jax.metrics.lpips import LPIPS, load_lpips

# The table's columns: (result key, header, decimals), in the papers' order.
TABLE = (("ssim", "SSIM ↑", 4), ("lpips", "LPIPS ↓", 4), ("fid", "FID ↓", 2), ("psnr", "PSNR ↑", 2), ("l1", "L1 ↓", 4))
SSIM_PROTOCOL = "skimage structural_similarity, win_size=51, data_range=1, uniform window, sample covariance"
MAX_LISTED = 5
# The pair names of `imagpose test` (and of PIDM/GFLA, PCDMs): the target after the last `_2_` (before `_vis`), or
# after the last `_to_`.
PAIR_NAMES = (re.compile(r"^(?P<source>.+)_2_(?P<target>.+)_vis$"), re.compile(r"^(?P<source>.+)_to_(?P<target>.+)$"))


class EvaluationError(ValueError):
    """Folders that cannot be evaluated as pairs; the message names the files."""


def _listing(names: Sequence[str]) -> str:
    """'a, b, c' (the first MAX_LISTED names, then '...')."""
    return ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")


def list_images(folder: str | os.PathLike) -> dict[str, str]:
    """{name without extension: file name} of the images (`IMAGE_EXTENSIONS`) directly in `folder`, sorted."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder")
    out: dict[str, str] = {}
    clashes = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in out:
            clashes.append(f"{out[stem]} and {name}")
        else:
            out[stem] = name
    if clashes:
        raise EvaluationError(f"{folder!r}: {len(clashes)} name(s) with two images (pairs match by name without "
                              f"extension): {_listing(clashes)}")
    if not out:
        raise EvaluationError(f"{folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def target_name(stem: str, targets) -> str | None:
    """The target (name without extension, in `targets`) a generated image's name pairs with: the same name, else
    the target part of a pair name (`PAIR_NAMES`); None if neither is in `targets`."""
    if stem in targets:
        return stem
    for pattern in PAIR_NAMES:
        m = pattern.match(stem)
        if m and m["target"] in targets:
            return m["target"]
    return None


def match_pairs(generated_dir: str | os.PathLike, targets_dir: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(name, generated path, target path) of every pair, sorted by name. EvaluationError naming the images
    without a counterpart (up to MAX_LISTED of each kind, and their count)."""
    generated_dir, targets_dir = os.fspath(generated_dir), os.fspath(targets_dir)
    gen, tgt = list_images(generated_dir), list_images(targets_dir)
    of = {s: target_name(s, tgt) for s in gen}
    problems = []
    alone = [gen[s] for s, t in of.items() if t is None]
    if alone:
        problems.append(f"{len(alone)} generated image(s) have no target in {targets_dir!r}: {_listing(alone)}")
    if not any(t is not None and t != s for s, t in of.items()):   # plain names: the folders hold the same names
        alone = [tgt[t] for t in tgt if t not in gen]
        if alone:
            problems.append(f"{len(alone)} target(s) have no generated image in {generated_dir!r}: {_listing(alone)}")
    if problems:
        raise EvaluationError("; ".join(problems))
    return [(s, os.path.join(generated_dir, gen[s]), os.path.join(targets_dir, tgt[of[s]])) for s in gen]


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: the image file as RGB / 255."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.height, im.width


def _one_size(sizes: Sequence[tuple[int, int]], paths: Sequence[str], what: str) -> tuple[int, int]:
    """The size all `paths` share, or EvaluationError listing each size with its count and an example."""
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for size, path in zip(sizes, paths):
        by_size[size].append(path)
    if len(by_size) > 1:
        listed = "; ".join(f"{h}x{w}: {len(ps)} (e.g. {os.path.basename(ps[0])})" for (h, w), ps in by_size.items())
        raise EvaluationError(f"{what} differ in size (batched metrics need one size; resize beforehand): {listed}")
    return next(iter(by_size))


def _check_sizes(pool: ThreadPoolExecutor, pairs: Sequence[tuple[str, str, str]]) -> tuple[int, int]:
    """(H, W) of every pair's images; EvaluationError naming the pairs whose two images differ in size."""
    sizes = list(pool.map(_size, [p for _, g, t in pairs for p in (g, t)]))
    bad = [f"{os.path.basename(g)} {gs[0]}x{gs[1]} vs {os.path.basename(t)} {ts[0]}x{ts[1]}"
           for (_, g, t), gs, ts in zip(pairs, sizes[0::2], sizes[1::2]) if gs != ts]
    if bad:
        raise EvaluationError(f"{len(bad)} pair(s) of generated image and target differ in size "
                              f"(H x W): {_listing(bad)}")
    return _one_size(sizes[1::2], [t for _, _, t in pairs], "the pairs")


def _prefetched(pool: ThreadPoolExecutor, items: Sequence, read: Callable, batch_size: int) -> Iterator[list]:
    """The values `read(item)` in batches of `batch_size` items; the next batch is read by `pool` while the
    caller works on the current one."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    pending = [pool.submit(read, item) for item in chunks[0]] if chunks else []
    for i in range(len(chunks)):
        done = [f.result() for f in pending]
        pending = [pool.submit(read, item) for item in chunks[i + 1]] if i + 1 < len(chunks) else []
        yield done


def _padded(images: list[np.ndarray], size: int) -> np.ndarray:
    """(size, H, W, 3): the batch with its last image repeated to fill it."""
    return np.stack(images + [images[-1]] * (size - len(images)))


def evaluate_folders(generated_dir: str | os.PathLike, targets_dir: str | os.PathLike, *,
                     lpips: LPIPS | None = None, inception: InceptionV3 | None = None,
                     fid_real_dir: str | os.PathLike | None = None, batch_size: int = 16, workers: int = 8,
                     ssim_kwargs: dict | None = None, progress: bool = True) -> dict:
    """The protocol (module docstring) over the pairs `match_pairs` finds.

    `lpips` (`load_lpips`) adds LPIPS, `inception` (`load_inception`) FID against `fid_real_dir`'s images (any
    one size) or, without it, against the targets. Returns {"n", "image_size": [H, W], "ssim", "lpips", "fid",
    "psnr", "l1" (means; None where not computed; psnr +inf if a pair is identical), "lpips_net",
    "fid_reference": {"set": "fid_real" | "targets", "dir", "n"} or None, "ssim_protocol", "generated_dir",
    "targets_dir", "pairs": [{"name", "generated", "target", "ssim", "psnr", "l1"[, "lpips"]}, ...]}.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be >= 1, got {batch_size}, {workers}")
    if fid_real_dir is not None and inception is None:
        raise ValueError("fid_real_dir is the FID reference: it needs an Inception model (inception=...)")
    pairs = match_pairs(generated_dir, targets_dir)
    n, bs = len(pairs), min(batch_size, len(pairs))
    real = None
    if fid_real_dir is not None:
        fid_real_dir = os.fspath(fid_real_dir)
        real = [os.path.join(fid_real_dir, f) for f in list_images(fid_real_dir).values()]
    if inception is not None and min(n, len(real or pairs)) < 2:
        raise EvaluationError(f"FID needs at least 2 images per set: {n} pair(s)"
                              + (f", {len(real)} image(s) in {fid_real_dir!r}" if real is not None else ""))
    per_pair: dict[str, list[np.ndarray]] = defaultdict(list)
    gen_features, ref_features = [], []
    with ThreadPoolExecutor(workers) as pool:
        size = _check_sizes(pool, pairs)
        if real is not None:
            _one_size(list(pool.map(_size, real)), real, f"the images of {fid_real_dir!r}")
        read_pair = lambda p: (read_image(p[1]), read_image(p[2]))  # noqa: E731
        with tqdm(total=n, desc="evaluate", unit="pair", disable=not progress) as bar:
            for batch in _prefetched(pool, pairs, read_pair, bs):
                m = len(batch)
                gen, tgt = _padded([g for g, _ in batch], bs), _padded([t for _, t in batch], bs)
                for k, v in pair_metrics(gen, tgt, lpips, batch_size=bs, ssim_kwargs=ssim_kwargs).items():
                    per_pair[k].append(v[:m])
                if inception is not None:
                    gen_features.append(inception_features(inception, gen, batch_size=bs)[:m])
                    if real is None:
                        ref_features.append(inception_features(inception, tgt, batch_size=bs)[:m])
                bar.update(m)
        if real is not None:
            rbs = min(batch_size, len(real))
            with tqdm(total=len(real), desc="FID reference", unit="image", disable=not progress) as bar:
                for batch in _prefetched(pool, real, read_image, rbs):
                    ref_features.append(inception_features(inception, _padded(batch, rbs), batch_size=rbs)[:len(batch)])
                    bar.update(len(batch))
    values = {k: np.concatenate(v) for k, v in per_pair.items()}
    means = {k: float(np.mean(values[k])) if k in values else None for k, _, _ in TABLE}
    if inception is not None:
        means["fid"] = fid_from_features(np.concatenate(gen_features), np.concatenate(ref_features))
    return {
        "n": n, "image_size": list(size), **means,
        "lpips_net": lpips.net_name if lpips is not None else None,
        "fid_reference": None if inception is None else {
            "set": "targets" if real is None else "fid_real",
            "dir": os.path.abspath(targets_dir if real is None else fid_real_dir), "n": n if real is None else len(real),
            "inception_variant": inception.variant},
        "ssim_protocol": SSIM_PROTOCOL if not ssim_kwargs else f"ssim(**{ssim_kwargs!r})",
        "generated_dir": os.path.abspath(generated_dir), "targets_dir": os.path.abspath(targets_dir),
        "pairs": [{"name": name, "generated": os.path.basename(g), "target": os.path.basename(t),
                   **{k: float(v[i]) for k, v in values.items()}} for i, (name, g, t) in enumerate(pairs)],
    }


# ----------------------------------------------------------------------------------------------
# Reports.

def _json_safe(v):
    """Non-finite floats -> None (strict JSON), recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _cell(v: float | None, decimals: int) -> str:
    if v is None:
        return "–"
    return "∞" if math.isinf(v) else f"{v:.{decimals}f}"


def metrics_table(result: dict, method: str = "imagpose-jax") -> str:
    """The Markdown table of the papers' DeepFashion results (`evaluate_folders`' result), with a note."""
    h, w = result["image_size"]
    ref = result["fid_reference"]
    notes = [f"DeepFashion protocol, {result['n']} pairs of {h}×{w} images",
             "SSIM: " + result["ssim_protocol"],
             f"LPIPS: v0.1, {result['lpips_net']}" if result["lpips_net"] else "LPIPS: not computed (no LPIPS weights)",
             (f"FID: against {ref['n']} {'targets' if ref['set'] == 'targets' else 'real images'} ({ref['dir']})"
              if ref else "FID: not computed (no Inception weights)"),
             "PSNR: dB, data range 1", "L1: mean absolute difference, values in [0, 1]"]
    return "\n".join([
        "| Method | " + " | ".join(header for _, header, _ in TABLE) + " |",
        "|:--|" + "--:|" * len(TABLE),
        f"| {method} | " + " | ".join(_cell(result[k], d) for k, _, d in TABLE) + " |",
        "", "; ".join(notes) + "."])


def write_reports(result: dict, out_dir: str | os.PathLike, method: str = "imagpose-jax") -> tuple[str, str]:
    """Write `out_dir/metrics.json` and `out_dir/metrics.md` (module docstring); returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "metrics.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(result), f, indent=1, allow_nan=False, ensure_ascii=False)
        f.write("\n")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(f"# Pose-transfer metrics\n\n{result['generated_dir']} against {result['targets_dir']}\n\n"
                f"{metrics_table(result, method)}\n")
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `imagpose evaluate --generated DIR --targets DIR --out DIR [...]`."""
    p = argparse.ArgumentParser(prog="imagpose evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--generated", required=True, help="folder of generated images, named as their targets")
    p.add_argument("--targets", required=True, help="folder of the ground-truth target images")
    p.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    p.add_argument("--fid-real", help="real images FID compares against (PIDM/PCDMs: the training images); "
                                      "default: the targets")
    p.add_argument("--lpips", nargs=2, metavar=("BACKBONE", "LINEAR"),
                   help="torchvision backbone and lpips v0.1 linear-layer files, e.g. alexnet-owt-7be5be79.pth "
                        "lpips/weights/v0.1/alex.pth")
    p.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS trunk (the protocol's: alex)")
    p.add_argument("--inception", metavar="WEIGHTS",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or torchvision's inception_v3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=8, help="threads reading images")
    p.add_argument("--method", default="imagpose-jax", help="the table row's label")
    args = p.parse_args(argv)
    if args.fid_real and not args.inception:
        p.error("--fid-real is the FID reference: it needs --inception WEIGHTS")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    lp = load_lpips(*args.lpips, net=args.lpips_net) if args.lpips else None
    inc = load_inception(args.inception) if args.inception else None
    try:
        result = evaluate_folders(args.generated, args.targets, lpips=lp, inception=inc, fid_real_dir=args.fid_real,
                                  batch_size=args.batch_size, workers=args.workers)
    except EvaluationError as err:
        raise SystemExit(f"error: {err}") from None
    json_path, md_path = write_reports(result, args.out, args.method)
    print(metrics_table(result, args.method))
    print(f"-> {json_path}, {md_path}")
    return 0
