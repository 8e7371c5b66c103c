"""`evaluate_pairs` / `pair_metrics`: the pose-transfer metrics of a set of generated images against their
targets (means / per pair)."""
from __future__ import annotations

import numpy as np

from imagpose_jax.metrics.batching import batched
from imagpose_jax.metrics.fid import InceptionV3, fid_from_features, inception_features
from imagpose_jax.metrics.image import as_images, l1, psnr, ssim
from imagpose_jax.metrics.lpips import LPIPS, lpips_distance


def _stack(images, name: str) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        shapes = {tuple(np.shape(a)) for a in images}
        if len(shapes) > 1:
            raise ValueError(f"{name}: images differ in shape: {sorted(shapes)}")
        images = np.stack([np.asarray(a) for a in images]) if images else np.zeros((0, 1, 1, 3), np.float32)
    return np.asarray(as_images(images, name)[0])


def _pairs(generated, targets) -> tuple[np.ndarray, np.ndarray]:
    gen, tgt = _stack(generated, "generated"), _stack(targets, "targets")
    if gen.shape != tgt.shape:
        raise ValueError(f"generated images {gen.shape} and targets {tgt.shape} differ in shape")
    if gen.shape[0] == 0:
        raise ValueError("no image pairs to evaluate")
    return gen, tgt


def pair_metrics(generated, targets, lpips: LPIPS | None = None, *, batch_size: int = 16,
                 ssim_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """Per-pair metrics of N (generated, target) pairs (inputs as `evaluate_pairs`): `ssim`, `psnr` (dB, +inf
    for identical images), `l1` and, with an `LPIPS` module, `lpips`; each (N,) float32."""
    gen, tgt = _pairs(generated, targets)
    skw = dict(ssim_kwargs or {})
    out = {
        "ssim": batched(lambda a, b: ssim(a, b, check_range=False, **skw), (gen, tgt), batch_size),
        "psnr": batched(lambda a, b: psnr(a, b, check_range=False), (gen, tgt), batch_size),
        "l1": batched(lambda a, b: l1(a, b, check_range=False), (gen, tgt), batch_size),
    }
    if lpips is not None:
        out["lpips"] = lpips_distance(lpips, gen, tgt, batch_size=batch_size)
    return out


def evaluate_pairs(generated, targets, lpips: LPIPS | None = None, fid: InceptionV3 | None = None, *,
                   batch_size: int = 16, ssim_kwargs: dict | None = None) -> dict:
    """Mean metrics over N (generated, target) pairs: (N, H, W, 3) arrays or lists of (H, W, 3), in [0, 1].

    Always: `ssim` (see `ssim`; `ssim_kwargs` overrides its protocol defaults), `psnr` (dB), `l1`. With an
    `LPIPS` module (`load_lpips`): `lpips`. With an `InceptionV3` module (`load_inception`): `fid` between
    the generated set and the target set (N >= 2; published FIDs use thousands of images). Also `n`.
    The means of `pair_metrics`.
    """
    gen, tgt = _pairs(generated, targets)
    n = gen.shape[0]
    if fid is not None and n < 2:
        raise ValueError("FID needs at least 2 images per set")
    per_pair = pair_metrics(gen, tgt, lpips, batch_size=batch_size, ssim_kwargs=ssim_kwargs)
    out = {"n": int(n), **{k: float(np.mean(v)) for k, v in per_pair.items()}}
    if fid is not None:
        out["fid"] = fid_from_features(inception_features(fid, gen, batch_size=batch_size),
                                       inception_features(fid, tgt, batch_size=batch_size))
    return out
