"""`imagpose test`: every pair of a pose-transfer test set generated, as the peers' evaluation scripts expect it.

  imagpose test --weights weights/ --pairs fasion-resize-pairs-test.csv \\
      --annotations fasion-resize-annotation-test.csv --images test/ --out results/test/
  imagpose test --weights weights/ --index test.json --out results/test/     (the original's JSON index)

Pairs: a DeepFashion ``from,to`` pairs CSV naming images of the annotation CSV (their keypoints) or of the original's
JSON index (their pose renderings; without ``--pairs``, each person's first view to each of its other views). Each
pair is one grid of the original's first scenario (the source in slots 0-2, the target pose in slot 3), prepared as
`IMAGPosePipeline` prepares ``imagpose generate``'s inputs; a pose given as keypoints is rendered at its image's own
size first, as the training pipeline does (`data.pipeline.load_view`). Grids run ``batch_size`` at a time through
the pipeline's sampler, which splits each batch over all local devices.

Outputs, named and sized as the peers' evaluation scripts expect:
  - ``naming="pidm"`` (default): ``{from}_2_{to}_vis.png`` (``from``/``to``: the image names without extension),
    PIDM's (ankanbhunia/PIDM ``data/fashion_data.py`` ``get_image_path``, from GFLA); the GFLA-derived metric scripts
    (PIDM ``utils/metrics.py`` ``preprocess_path_for_deform_task``) find the target as ``name.split('_2_')[-1]
    .split('_vis')[0]``;
  - ``naming="pcdms"``: ``{from}_to_{to}.png``, PCDMs' (tencent-ailab/PCDMs ``stage3_batchtest_refined_model.py``);
    its ``metrics.py`` finds the target as ``name.split('_to_')[-1]``.
  Size: 256x176 (H x W) by default, the DeepFashion protocol's (PCDMs ``caculate_metrics_256.py`` and PIDM's
  metrics resize to 176x256 W x H; CFLD ``pose_transfer_test.py`` interpolates its samples, bicubic, to the size
  of its ground truth), or 512x352 (PCDMs ``caculate_metrics_512.py``): the generated view is resized to it (bicubic).
  ``imagpose evaluate`` pairs both namings with their targets.

Resumable: a pair whose output exists is skipped, so a rerun after an interruption generates only the rest. Each
image is written under a temporary name (``.NAME.partial-PID``, which ``imagpose evaluate`` ignores) and renamed
into place (``os.replace``), so a killed run never leaves a partial PNG under an output name. A pair's starting noise
depends only on the seed and the pair's place in the pairs file (`IMAGPosePipeline.generate_grids` ``indices``), so a
resumed run writes what an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from imagpose_jax.data.grid import untile
from imagpose_jax.data.index import (DataFormatError, View, read_deepfashion, read_deepfashion_pairs,
                                     read_imagpose_json)
from imagpose_jax.data.pose import render_pose
from imagpose_jax.images import to_uint8
from imagpose_jax.preprocess import load_image

NAMINGS = {"pidm": "{source}_2_{target}_vis.png", "pcdms": "{source}_to_{target}.png"}
PROTOCOL_SIZE = (256, 176)          # (H, W): DeepFashion's pose-transfer evaluation size; 512x352 the large one
GRIDS_PER_DEVICE = 4                # the default batch: this many grids per local device
PARTIAL = ".{name}.partial-{pid}"   # an output being written


@dataclasses.dataclass(frozen=True)
class TestPair:
    index: int        # the pair's place in the pairs file (its noise)
    source: View
    target: View
    name: str         # the output file name


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def output_name(source: str, target: str, naming: str = "pidm") -> str:
    """The output file name of the pair (source, target) (image names or paths; extensions dropped)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
    return NAMINGS[naming].format(source=_stem(source), target=_stem(target))


def read_test_pairs(*, pairs_csv: str | os.PathLike | None = None, annotations_csv: str | os.PathLike | None = None,
                    image_dir: str | os.PathLike | None = None, index_json: str | os.PathLike | None = None,
                    naming: str = "pidm") -> list[TestPair]:
    """The pairs of a test set: ``annotations_csv`` + ``image_dir`` (DeepFashion: keypoints) with ``pairs_csv``, or
    ``index_json`` (the original's index: pose renderings) with or without it. Names in the pairs file match images
    by name without extension (``a.jpg`` finds ``a.png``). A pair listed twice is generated once; a name with no
    image, or two images with one name, is a DataFormatError naming the files."""
    if (index_json is None) == (annotations_csv is None):
        raise ValueError("give either annotations_csv (with image_dir and pairs_csv) or index_json")
    if index_json is not None:
        source = os.fspath(index_json)
        persons = read_imagpose_json(source)
    else:
        if image_dir is None or pairs_csv is None:
            raise ValueError("a DeepFashion test set needs image_dir and pairs_csv beside annotations_csv")
        source = os.fspath(annotations_csv)
        persons = read_deepfashion(source, image_dir)
    views: dict[str, View] = {}
    for person in persons:
        for view in person.views:
            stem = _stem(view.image)
            if stem in views and views[stem].image != view.image:
                raise DataFormatError(f"{source!r} lists two images named {stem!r}: {views[stem].image!r} and "
                                      f"{view.image!r} (pairs name images by file name)")
            views[stem] = view
    if pairs_csv is not None:
        names = read_deepfashion_pairs(pairs_csv)
        where = os.fspath(pairs_csv)
    else:
        names = [(p.views[0].image, v.image) for p in persons for v in p.views[1:]]
        where = source
    pairs, seen = [], set()
    for i, (a, b) in enumerate(names):
        for n in (a, b):
            if _stem(n) not in views:
                raise DataFormatError(f"{where!r}: pair {i + 1} ({a} -> {b}) names {n!r}, which is not in {source!r}")
        name = output_name(a, b, naming)
        if name not in seen:
            seen.add(name)
            pairs.append(TestPair(i, views[_stem(a)], views[_stem(b)], name))
    if not pairs:
        raise DataFormatError(f"{where!r} holds no pairs")
    return pairs


def _pose(view: View, size: tuple[int, int] | None = None):
    """The view's pose as `IMAGPosePipeline.prepare` takes it: its rendering's path, or its keypoints rendered at
    the image's size (W, H) (read from the file when not given), a uint8 (H, W, 3) array."""
    if view.pose_image is not None:
        return view.pose_image
    if size is None:
        with Image.open(view.image) as im:   # the header only
            size = im.size
    return render_pose(view.keypoints, size[1], size[0])


def _batch(pipe, pairs: Sequence[TestPair], view_size: tuple[int, int]):
    """The pairs' grids as one `Batch`, and the slot of each grid's target."""
    from imagpose_jax.data.batch import Batch
    batches, slots = [], []
    for p in pairs:
        image = load_image(p.source.image)
        batch, (layout,) = pipe.prepare([image], [_pose(p.source, image.size)], [_pose(p.target)], view_size)
        batches.append(batch)
        slots.append(layout.targets()[0][0])
    return Batch(*(np.concatenate(field) for field in zip(*batches))), slots


def _save_atomic(path: str, image: Image.Image) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, PARTIAL.format(name=name, pid=os.getpid()))
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def generate_test_set(pipe, pairs: Sequence[TestPair], out_dir: str | os.PathLike, *,
                      view_size: tuple[int, int] = (512, 512), size: tuple[int, int] = PROTOCOL_SIZE, seed: int = 42,
                      batch_size: int | None = None, progress: bool = True,
                      on_batch: Callable[[list[str]], None] | None = None) -> dict:
    """Generates every pair whose output is not in ``out_dir`` yet (module docstring).

    Args:
      pipe: an `IMAGPosePipeline`.
      pairs: `read_test_pairs`' pairs.
      view_size: (H, W) of the views the model generates (multiples of the model's view multiple).
      size: (H, W) of the written images.
      batch_size: grids per compiled batch (default `GRIDS_PER_DEVICE` per local device); the last batch is padded.
      on_batch: called after each batch with the paths it wrote (an exception from it stops the run there).
    Returns:
      {"pairs": all, "generated": written now, "skipped": found done, "out_dir"}.
    """
    import jax
    from tqdm import tqdm

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), PARTIAL.format(name="*", pid="*"))):
        os.remove(stale)   # left by a killed run
    bs = GRIDS_PER_DEVICE * jax.local_device_count() if batch_size is None else batch_size
    if bs < 1:
        raise ValueError(f"batch_size must be at least 1, got {bs}")
    todo = [p for p in pairs if not os.path.isfile(os.path.join(out_dir, p.name))]
    h, w = size
    with tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="test set", unit="pair",
              disable=not progress) as bar:
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            batch, slots = _batch(pipe, chunk, view_size)
            pad = np.minimum(np.arange(bs), len(chunk) - 1)   # one batch shape: one compiled program
            grids = pipe.generate_grids(type(batch)(*(x[pad] for x in batch)), seed=seed, batch_size=bs,
                                        progress=False, indices=[chunk[i].index for i in pad])
            written = []
            for p, grid, slot in zip(chunk, grids, slots):
                path = os.path.join(out_dir, p.name)
                _save_atomic(path, Image.fromarray(to_uint8(untile(grid)[slot])).resize((w, h), Image.BICUBIC))
                written.append(path)
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(written)
    return {"pairs": len(pairs), "generated": len(todo), "skipped": len(pairs) - len(todo), "out_dir": out_dir}
