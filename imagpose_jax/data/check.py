"""Every image and pose rendering of a training index checked before training starts (issue 15).

A full decode of every file can take long on a large dataset, so each file gets the cheapest check that still
reads all of it: a PNG's chunks through IEND with their CRCs (`Image.verify`: no inflating), any other format
decoded (JPEG at 1/8 scale, `Image.draft`: the whole entropy-coded stream is read, the inverse DCT mostly
skipped), in 16 threads with a progress bar. On 512x512 views that is some 60 times less work than a full
decode for a PNG and 4 times for a JPEG. What passes here and still fails to decode during training stops it
naming the file (or is skipped with `data.skip_corrupt`).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from PIL import Image

from imagpose_jax.data.index import Person
from imagpose_jax.data.pipeline import SKIP_HINT, UNREADABLE, CorruptDataError, CorruptImageError


def check_file(path: str) -> str | None:
    """Why `path` is not a readable image, or None."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                im.draft(im.mode, (1, 1))
                im.load()
    except UNREADABLE as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_images(persons: Sequence[Person], *, skip_corrupt: bool = False, max_corrupt_fraction: float = 0.01,
                 threads: int = 16, progress: bool = False) -> list[Person]:
    """The persons, every image and pose-rendering file checked (`check_file`).

    Without ``skip_corrupt`` the first unreadable file in index order raises ``CorruptImageError`` naming it, with
    the hint to set ``data.skip_corrupt``. With it, the views using an unreadable file are left out (a warning
    names the first ones), unless more than ``max_corrupt_fraction`` of the files are unreadable:
    ``CorruptDataError``.
    """
    paths = list(dict.fromkeys(p for person in persons for v in person.views for p in (v.image, v.pose_image) if p))
    t0, bad = time.perf_counter(), {}
    from tqdm import tqdm
    pool = ThreadPoolExecutor(threads)
    try:
        for path, reason in tqdm(zip(paths, pool.map(check_file, paths)), total=len(paths), desc="checking images",
                                 unit="file", disable=not progress, dynamic_ncols=True):
            if reason is None:
                continue
            if not skip_corrupt:
                raise CorruptImageError(path, reason, SKIP_HINT)
            bad[path] = reason
    finally:
        pool.shutdown(cancel_futures=True)
    logging.info("checked %d image files in %.1f s: %d unreadable", len(paths), time.perf_counter() - t0, len(bad))
    if not bad:
        return list(persons)
    first = "; ".join(f"{p!r}: {r}" for p, r in list(bad.items())[:3])
    if len(bad) > max_corrupt_fraction * len(paths):
        raise CorruptDataError(f"{len(bad)} of {len(paths)} image files ({len(bad) / len(paths):.1%}) are unreadable, "
                               f"more than data.max_corrupt_fraction={max_corrupt_fraction}; the first: {first}")
    logging.warning("%d of %d image files are unreadable: the views using them are left out (data.skip_corrupt); "
                    "the first: %s", len(bad), len(paths), first)
    return [Person(p.name, tuple(v for v in p.views if v.image not in bad and v.pose_image not in bad))
            for p in persons]
