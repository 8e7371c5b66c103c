"""`evaluate_pairs`: the pose-transfer metrics of a set of generated images against their targets."""
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


def evaluate_pairs(generated, targets, lpips: LPIPS | None = None, fid: InceptionV3 | None = None, *,
                   batch_size: int = 16, ssim_kwargs: dict | None = None) -> dict:
    """Mean metrics over N (generated, target) pairs: (N, H, W, 3) arrays or lists of (H, W, 3), in [0, 1].

    Always: `ssim` (see `ssim`; `ssim_kwargs` overrides its protocol defaults), `psnr` (dB), `l1`. With an
    `LPIPS` module (`load_lpips`): `lpips`. With an `InceptionV3` module (`load_inception`): `fid` between
    the generated set and the target set (N >= 2; published FIDs use thousands of images). Also `n`.
    """
    gen, tgt = _stack(generated, "generated"), _stack(targets, "targets")
    if gen.shape != tgt.shape:
        raise ValueError(f"generated images {gen.shape} and targets {tgt.shape} differ in shape")
    n = gen.shape[0]
    if n == 0:
        raise ValueError("no image pairs to evaluate")
    if fid is not None and n < 2:
        raise ValueError("FID needs at least 2 images per set")
    skw = dict(ssim_kwargs or {})
    out = {
        "n": int(n),
        "ssim": float(np.mean(batched(lambda a, b: ssim(a, b, check_range=False, **skw), (gen, tgt), batch_size))),
        "psnr": float(np.mean(batched(lambda a, b: psnr(a, b, check_range=False), (gen, tgt), batch_size))),
        "l1": float(np.mean(batched(lambda a, b: l1(a, b, check_range=False), (gen, tgt), batch_size))),
    }
    if lpips is not None:
        out["lpips"] = float(np.mean(lpips_distance(lpips, gen, tgt, batch_size=batch_size)))
    if fid is not None:
        out["fid"] = fid_from_features(inception_features(fid, gen, batch_size=batch_size),
                                       inception_features(fid, tgt, batch_size=batch_size))
    return out
