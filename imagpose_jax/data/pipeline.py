"""Training and evaluation examples on the 2x2 grid (spec sections 2 and 6), with grain.

One example is four views of one person tiled row-major (slot 0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right), with the keys of the one host batch type, `data.batch.Batch` (`data.batch.make_example`):
the grid of all four views, the known slots, the pose grid, the reference view for the patch tokens and its
CLIP pre-processing for DINOv2 (done here, in the data workers, not on the training loop's thread).

Views are resized to cover H x W keeping their aspect (bicubic), cropped to H x W and maybe
flipped; a training example draws one crop position and one flip for all four slots, images and
poses alike. Poses come from the index's pose renderings, or are drawn from its keypoints at the
image's own size before the same resize and crop.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import jax
from absl import flags
import numpy as np
from PIL import Image

from imagpose_jax.data.batch import make_example, stack, to_signed
from imagpose_jax.data.grid import SCENARIOS, SOURCE, check_view_size
from imagpose_jax.data.index import Person, View
from imagpose_jax.data.pose import render_pose

Example = dict[str, np.ndarray]


# What PIL raises on a file it cannot read or decode (a missing file is an OSError too).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
SKIP_HINT = ("set --config.data.skip_corrupt=True to skip the examples that use an unreadable file (giving up past "
             "data.max_corrupt_fraction of them)")
MIN_DRAWN = 100  # examples drawn before the fraction of skipped ones is checked


class CorruptImageError(OSError):
    """An image or pose rendering that cannot be read or decoded; the message names the file (and a `hint`)."""

    def __init__(self, path: str, reason: str, hint: str = ""):
        super().__init__(f"cannot read image {path!r}: {reason}" + (f"; {hint}" if hint else ""))
        self.path, self.reason = path, reason


class CorruptDataError(RuntimeError):
    """Too large a fraction of the data is unreadable (`data.max_corrupt_fraction`): skipping gave up."""


@dataclasses.dataclass(frozen=True)
class CorruptSample:
    """Stands in for an example skipped because of an unreadable file (``skip_corrupt=True``)."""
    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Crop:
    """One crop/flip draw: the crop's offset as a fraction of the slack in each axis."""
    fy: float = 0.5
    fx: float = 0.5
    flip: bool = False


def _open_rgb(path: str) -> Image.Image:
    from imagpose_jax.preprocess import to_rgb  # 16-bit scaled, transparency over the backdrop
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except UNREADABLE as err:
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from err


def _cover_crop(image: Image.Image, height: int, width: int, crop: Crop) -> np.ndarray:
    """Resize to cover height x width keeping the aspect, crop there, maybe flip: (H, W, 3) uint8."""
    w, h = image.size
    if w * height > h * width:  # wider than the target: match heights
        size = (w * height // h, height)
    else:
        size = (width, h * width // w)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    top = min(int(crop.fy * (size[1] - height + 1)), size[1] - height)
    left = min(int(crop.fx * (size[0] - width + 1)), size[0] - width)
    out = np.asarray(image)[top:top + height, left:left + width]
    return np.ascontiguousarray(out[:, ::-1] if crop.flip else out)


def load_view(view: View, height: int, width: int, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    """A view's image and pose rendering, resized, cropped and flipped alike: two (H, W, 3) uint8."""
    image = _open_rgb(view.image)
    if view.pose_image is not None:
        pose = _open_rgb(view.pose_image)
    elif view.keypoints is not None:
        pose = Image.fromarray(render_pose(view.keypoints, image.height, image.width))
    else:
        raise ValueError(f"view {view.image!r} has neither a pose rendering nor keypoints")
    return _cover_crop(image, height, width, crop), _cover_crop(pose, height, width, crop)


def build_example(images: np.ndarray, poses: np.ndarray, known: np.ndarray, ref_slot: int) -> Example:
    """An example from four loaded views: images and poses (4, H, W, 3) uint8, known (4,) bool, a known ref slot."""
    known = np.asarray(known, dtype=bool)
    if not known[ref_slot]:
        raise ValueError(f"the reference slot {ref_slot} is not known: {known.tolist()}")
    return make_example(to_signed(images), poses.astype(np.float32) / 255.0, known, images[ref_slot])


@dataclasses.dataclass
class TrainExampleTransform(grain.transforms.RandomMap):
    """Person -> one training example (spec section 6), all randomness from grain's per-record rng.

    Four picks among the person's views (not all the same view); each slot known with
    probability 1/2, all-known and all-unknown redrawn; one crop/flip for everything; the
    reference is a random known slot. An unreadable file raises ``CorruptImageError`` (naming it, with
    ``SKIP_HINT``); with ``skip_corrupt``, it gives a ``CorruptSample`` instead.
    """
    height: int
    width: int
    skip_corrupt: bool = False

    def random_map(self, person: Person, rng: np.random.Generator) -> Example | CorruptSample:
        n = len(person.views)
        picks = rng.integers(n, size=4)
        while np.all(picks == picks[0]):
            picks = rng.integers(n, size=4)
        known = rng.random(4) < 0.5
        while known.all() or not known.any():
            known = rng.random(4) < 0.5
        ref_slot = int(rng.choice(np.flatnonzero(known)))
        crop = Crop(fy=float(rng.random()), fx=float(rng.random()), flip=bool(rng.random() < 0.5))
        try:
            loaded = [load_view(person.views[i], self.height, self.width, crop) for i in picks]
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise CorruptImageError(err.path, err.reason, SKIP_HINT) from err
            return CorruptSample(err.path, str(err))
        images, poses = (np.stack(x) for x in zip(*loaded))
        return build_example(images, poses, known, ref_slot)


class PersonSource(grain.sources.RandomAccessDataSource):
    """Random access over the persons with at least two views (the others are left out)."""

    def __init__(self, persons: Sequence[Person]):
        self._persons = [p for p in persons if len(p.views) >= 2]
        self.num_left_out = len(persons) - len(self._persons)
        if not self._persons:
            raise ValueError(f"no person has two or more views ({len(persons)} persons)")

    def __len__(self) -> int:
        return len(self._persons)

    def __getitem__(self, index: int) -> Person:
        return self._persons[index]


class TrainIterator(grain.DatasetIterator):
    """Batches of training examples (a leading batch axis on every key of ``build_example``).

    Corrupt samples from the parent iterator are dropped, counted in ``skipped_corrupt`` and
    logged; once ``MIN_DRAWN`` examples were drawn (since this iterator was made or restored), more than
    ``max_corrupt_fraction`` of them skipped raises ``CorruptDataError`` (never an endless loop over unreadable
    files). ``get_state``/``set_state`` (JSON-serialisable; also orbax's grain checkpointing) resume the exact
    stream.
    """

    def __init__(self, examples: grain.DatasetIterator, batch_size: int, max_corrupt_fraction: float = 0.01):
        super().__init__(examples)
        if not 0 <= max_corrupt_fraction < 1:
            raise ValueError(f"data.max_corrupt_fraction must be in [0, 1), got {max_corrupt_fraction}")
        self._batch_size, self._max_fraction = batch_size, max_corrupt_fraction
        self.skipped_corrupt = 0
        self._drawn = self._skipped = 0  # since this iterator was made or restored

    def __next__(self) -> Example:
        batch = []
        while len(batch) < self._batch_size:
            example = next(self._parent)
            self._drawn += 1
            if isinstance(example, CorruptSample):
                self.skipped_corrupt += 1
                self._skipped += 1
                logging.warning("skipped a training example: %s", example.reason)
                self._check_fraction(example)
                continue
            batch.append(example)
        return dict(stack(batch)._asdict())

    def _check_fraction(self, last: CorruptSample) -> None:
        if self._drawn >= MIN_DRAWN and self._skipped > self._max_fraction * self._drawn:
            raise CorruptDataError(
                f"{self._skipped} of the {self._drawn} training examples drawn so far were skipped for unreadable "
                f"files ({self._skipped / self._drawn:.1%}), more than data.max_corrupt_fraction={self._max_fraction}: "
                f"giving up (the last: {last.reason}). Check the data and its file system, or raise "
                f"data.max_corrupt_fraction")

    def get_state(self) -> dict[str, Any]:
        return {"examples": self._parent.get_state(), "skipped_corrupt": self.skipped_corrupt}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["examples"])
        self.skipped_corrupt = int(state["skipped_corrupt"])
        self._drawn = self._skipped = 0


def make_train_iterator(persons: Sequence[Person], height: int, width: int, *, batch_size: int, seed: int,
                        shard_index: int | None = None, shard_count: int | None = None,
                        skip_corrupt: bool = False, max_corrupt_fraction: float = 0.01, read_threads: int = 0,
                        worker_count: int = 0, prefetch: int = 8) -> TrainIterator:
    """An endless, deterministic stream of training batches for this host.

    The persons are shuffled anew each epoch (seeded), each record becomes one example
    (``TrainExampleTransform``, its randomness seeded by ``seed`` and the record's global
    position), and the global stream is dealt round-robin to ``shard_count`` hosts: this host
    takes positions ``shard_index, shard_index + shard_count, ...`` (defaults: jax's process index
    and count). The same arguments give the same batches; the hosts' union is the one-host stream.

    Args:
      persons: the index (``index.read_imagpose_json`` / ``read_deepfashion``).
      height, width: view size, multiples of 64; the grids are twice that.
      batch_size: examples per batch on this host.
      seed: shuffling and augmentation seed, in [0, 2**32).
      skip_corrupt: drop (and count) examples with an unreadable file instead of raising.
      max_corrupt_fraction: with skip_corrupt, the largest fraction of the examples drawn that may be skipped
        (checked after ``MIN_DRAWN``): past it ``CorruptDataError``.
      read_threads: grain threads preparing examples in each process (0: in the caller's thread).
      worker_count: grain worker processes (0: none).
      prefetch: examples buffered per process when read_threads or worker_count is set.
    Returns:
      A ``TrainIterator``: ``next(it)`` is a batch dict; ``it.get_state()``/``it.set_state(s)``
      save and restore its position; ``it.skipped_corrupt`` counts skipped examples.

    Workers are spawned processes: a script using ``worker_count`` needs the
    ``if __name__ == "__main__":`` guard.
    """
    check_view_size(height, width)
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    source = PersonSource(persons)
    if source.num_left_out:
        logging.warning("left out %d persons with fewer than two views", source.num_left_out)
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=seed)
          .repeat()
          .random_map(TrainExampleTransform(height, width, skip_corrupt), seed=seed))
    ds = ds[shard_index::shard_count]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count:
        if not flags.FLAGS.is_parsed():  # grain issue #1355: workers read an absl flag unparsed
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                                 per_worker_buffer_size=prefetch))
    return TrainIterator(iter(it_ds), batch_size, max_corrupt_fraction)


def make_eval_example(person: Person, scenario: int, height: int, width: int,
                      view_ids: Sequence[int] | None = None) -> Example:
    """A deterministic inference-scenario example for a held-out person (centre crop, no flip).

    The slots are `grid.SCENARIOS[scenario]`; ``view_ids`` picks the person's views for its sources then its
    targets (default: the first ones):
      scenario 1: (source, target): the source in slots 0-2, the target in slot 3;
      scenario 2: (source, t1, t2, t3): the source in slot 0, the targets in slots 1-3;
      scenario 3: (s1, s2, s3, target): three different sources in slots 0-2, the target in slot 3.
    The reference is slot 0. Returns ``build_example``'s keys; ``grid`` holds every slot's true view
    (the ground truth; the sampler masks the unknown slots itself).
    """
    check_view_size(height, width)
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {tuple(SCENARIOS)}, got {scenario!r}")
    layout = SCENARIOS[scenario]
    positions = [i if kind == SOURCE else layout.num_sources + i for kind, i in layout.slots]
    known = layout.known
    needed = max(positions) + 1
    view_ids = tuple(range(needed)) if view_ids is None else tuple(view_ids)
    if len(view_ids) != needed or len(set(view_ids)) != needed:
        raise ValueError(f"scenario {scenario} needs {needed} distinct view ids, got {view_ids}")
    if max(view_ids) >= len(person.views) or min(view_ids) < 0:
        raise ValueError(f"person {person.name!r} has {len(person.views)} views, asked for {view_ids}")
    loaded = {i: load_view(person.views[i], height, width, Crop()) for i in view_ids}
    images, poses = (np.stack([loaded[view_ids[p]][k] for p in positions]) for k in (0, 1))
    return build_example(images, poses, np.array(known), ref_slot=0)
