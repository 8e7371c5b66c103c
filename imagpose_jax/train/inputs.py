"""The training data named by a config's `data` block: persons for the grain pipeline, this host's share of
the global batch, and fixed held-out examples for sample grids."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from imagpose_jax.data.check import check_images
from imagpose_jax.data.index import Person, read_deepfashion, read_imagpose_json
from imagpose_jax.data.pipeline import TrainIterator, make_eval_example, make_train_iterator

FORMATS = ("synthetic", "imagpose_json", "deepfashion")


def synthetic_root(c: ml_collections.ConfigDict, workdir: str) -> str:
    return c.data.path or os.path.join(workdir, "data")


def ensure_synthetic(c: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes the synthetic dataset (once, by process 0; others wait) and returns its split index files."""
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    root, s = synthetic_root(c, workdir), c.data.synthetic
    if "://" in root:
        raise ValueError(f"the synthetic dataset is written with local file I/O, not to {root!r}: set "
                         f"--config.data.path to a local folder (every host needs it; a shared file system, or "
                         f"each host its own copy: the data is a function of data.synthetic.seed)")
    index = {split: os.path.join(root, f"{split}.json") for split in ("train", "test")}
    if jax.process_index() == 0 and not os.path.isfile(index["train"]):
        make_synthetic_dataset(root, num_persons=s.num_persons, poses_per_person=s.poses_per_person,
                               height=c.data.height, width=c.data.width, seed=s.seed, test_fraction=s.test_fraction)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("synthetic dataset written")
    return index


def read_persons(c: ml_collections.ConfigDict, workdir: str, split: str = "train") -> list[Person]:
    fmt = c.data.format
    if fmt == "synthetic":
        return read_imagpose_json(ensure_synthetic(c, workdir)[split])
    if split != "train":
        raise ValueError(f"only the synthetic format has a held-out split here; got split {split!r} for {fmt!r}")
    if fmt == "imagpose_json":
        if not c.data.index:
            raise ValueError("data.format 'imagpose_json' needs data.index (the JSON list of per-person image lists)")
        return read_imagpose_json(c.data.index)
    if fmt == "deepfashion":
        if not (c.data.annotations and c.data.image_dir):
            raise ValueError("data.format 'deepfashion' needs data.annotations (fasion-resize-annotation-*.csv) "
                             "and data.image_dir")
        return read_deepfashion(c.data.annotations, c.data.image_dir)
    raise ValueError(f"unknown data.format {fmt!r}; use one of {FORMATS}")


def per_host_batch(global_batch: int, mesh: jax.sharding.Mesh) -> int:
    """This host's share of the global batch; the global batch must split evenly over hosts and batch devices."""
    from imagpose_jax.sharding.mesh import BATCH_AXES
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    if global_batch % shards or global_batch % jax.process_count():
        raise ValueError(f"data.batch_size {global_batch} must be a multiple of the batch devices ({shards}) "
                         f"and of the hosts ({jax.process_count()})")
    return global_batch // jax.process_count()


def train_iterator(c: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *,
                   progress: bool = False) -> TrainIterator:
    """The grain stream of this host's batches, every file of the index checked first (`data.check_images`)."""
    d = c.data
    persons = read_persons(c, workdir)
    if d.check_images:
        persons = check_images(persons, skip_corrupt=d.skip_corrupt, max_corrupt_fraction=d.max_corrupt_fraction,
                               progress=progress and jax.process_index() == 0)
    return make_train_iterator(persons, d.height, d.width,
                               batch_size=per_host_batch(d.batch_size, mesh), seed=c.seed,
                               shard_index=jax.process_index(), shard_count=jax.process_count(),
                               skip_corrupt=d.skip_corrupt, max_corrupt_fraction=d.max_corrupt_fraction,
                               read_threads=d.read_threads, worker_count=d.worker_count, prefetch=d.prefetch)


def sample_examples(c: ml_collections.ConfigDict, workdir: str, count: int = 2) -> list[dict]:
    """Fixed scenario-1 examples for sample grids: held-out persons (synthetic) or the first training persons."""
    split = "test" if c.data.format == "synthetic" else "train"
    persons = [p for p in read_persons(c, workdir, split) if len(p.views) >= 2][:count]
    return [make_eval_example(p, 1, c.data.height, c.data.width) for p in persons]
