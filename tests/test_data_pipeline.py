"""Training and evaluation examples: grid invariants, shared crop/flip, determinism, state, sharding."""
import json

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.data.batch import masked_views
from imagpose_jax.preprocess import clip_preprocess
from imagpose_jax.data.index import Person, View, read_imagpose_json
from imagpose_jax.data.pipeline import (CorruptImageError, Crop, load_view, make_eval_example,
                                        make_train_iterator)
from imagpose_jax.data.synthetic import make_synthetic_dataset

H = W = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_persons=5, poses_per_person=4,
                                  height=H, width=W, seed=1, test_fraction=0.2)


@pytest.fixture(scope="module")
def persons(files):
    return read_imagpose_json(files["train"].index_json)


def slots(grid):
    """(..., 2h, 2w, C) -> (..., 4, h, w, C), row-major slots."""
    *lead, h2, w2, c = grid.shape
    g = grid.reshape(*lead, 2, h2 // 2, 2, w2 // 2, c)
    return np.moveaxis(g, -3, -4).reshape(*lead, 4, h2 // 2, w2 // 2, c)


def to_uint8(x):
    return np.rint((x + 1) * 127.5).astype(np.uint8)


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shapes_and_ranges(persons):
    b = next(make_train_iterator(persons, H, W, batch_size=3, seed=0, shard_index=0, shard_count=1))
    shapes = {k: (v.shape, v.dtype.name) for k, v in b.items()}
    assert shapes == {
        "grid": ((3, 128, 128, 3), "float32"), "pose_grid": ((3, 128, 128, 3), "float32"), "known": ((3, 4), "bool"),
        "ref_pixels": ((3, 64, 64, 3), "float32"), "dino_pixels": ((3, 224, 224, 3), "float32")}
    for key in ("grid", "ref_pixels"):
        assert b[key].min() >= -1 and b[key].max() <= 1
    assert b["pose_grid"].min() == 0 and b["pose_grid"].max() <= 1 and b["pose_grid"].max() > 0.5


def test_example_invariants(persons):
    it = make_train_iterator(persons, H, W, batch_size=8, seed=5, shard_index=0, shard_count=1)
    refs_in_slot = np.zeros(4, int)
    for b in batches(it, 6):
        for grid, known, ref, dino in zip(b["grid"], b["known"], b["ref_pixels"], b["dino_pixels"]):
            assert known.any() and not known.all()
            views = slots(grid)
            assert not all(np.array_equal(views[0], v) for v in views[1:])  # not one view four times
            matches = [s for s in range(4) if known[s] and np.array_equal(views[s], ref)]
            assert matches, "the reference is not a known slot"
            refs_in_slot[matches[0]] += 1
            np.testing.assert_array_equal(dino, clip_preprocess(to_uint8(ref)))  # CLIP's input, made by the workers
    assert (refs_in_slot > 0).sum() >= 3  # the reference moves between slots


@pytest.fixture(scope="module")
def coded_persons(tmp_path_factory):
    """Two persons with 64 x 96 views whose red channel is the column index (so a crop's offset and
    flip can be read off) and green the view id; pose files are the same with blue 200."""
    root = tmp_path_factory.mktemp("coded")
    persons = []
    for p in range(2):
        views = []
        for v in range(3):
            image = np.zeros((H, 96, 3), np.uint8)
            image[..., 0] = np.arange(96)[None, :]
            image[..., 1] = 40 * (3 * p + v) + 10
            paths = []
            for kind, blue in (("image", 0), ("pose", 200)):
                image[..., 2] = blue
                paths.append(str(root / f"{kind}_{p}_{v}.png"))
                Image.fromarray(image).save(paths[-1])
            views.append(View(image=paths[0], pose_image=paths[1]))
        persons.append(Person(name=str(p), views=tuple(views)))
    return persons


def test_one_crop_and_flip_for_all_slots_images_and_poses(coded_persons):
    it = make_train_iterator(coded_persons, H, W, batch_size=16, seed=2, shard_index=0, shard_count=1)
    seen_offsets, seen_flips = set(), set()
    for b in batches(it, 3):
        for grid, pose in zip(slots(to_uint8(b["grid"])), slots(np.rint(b["pose_grid"] * 255).astype(np.uint8))):
            columns = grid[:, 0, :, 0]  # (4, 64): the source columns each slot shows
            assert (columns == columns[0]).all() and (pose[:, 0, :, 0] == columns[0]).all()
            step = np.diff(columns[0].astype(int))
            assert (step == 1).all() or (step == -1).all()
            seen_flips.add(bool(step[0] < 0))
            seen_offsets.add(int(columns[0].min()))
            np.testing.assert_array_equal(pose[..., 1], grid[..., 1])  # each slot's pose is its own view's
            assert (grid[..., 2] == 0).all() and (pose[..., 2] == 200).all()
            assert len({int(g) for g in grid[:, 0, 0, 1]}) >= 2  # four picks, not all the same
    assert seen_flips == {False, True} and len(seen_offsets) > 5


def test_deterministic_from_seed(persons):
    def first(seed):
        return batches(make_train_iterator(persons, H, W, batch_size=4, seed=seed, shard_index=0, shard_count=1), 3)
    a = first(7)
    assert_same(a, first(7))
    assert not np.array_equal(a[0]["grid"], first(8)[0]["grid"])


def test_state_save_and_restore(persons):
    it = make_train_iterator(persons, H, W, batch_size=2, seed=3, shard_index=0, shard_count=1)
    batches(it, 5)  # more than an epoch of 4 persons
    state = json.loads(json.dumps(it.get_state()))
    expected = batches(it, 4)
    fresh = make_train_iterator(persons, H, W, batch_size=2, seed=3, shard_index=0, shard_count=1)
    fresh.set_state(state)
    assert_same(batches(fresh, 4), expected)


def test_shards_split_the_one_host_stream(persons):
    whole = batches(make_train_iterator(persons, H, W, batch_size=1, seed=4, shard_index=0, shard_count=1), 6)
    shards = [batches(make_train_iterator(persons, H, W, batch_size=1, seed=4, shard_index=i, shard_count=2), 3)
              for i in range(2)]
    assert_same(whole, [shards[i % 2][i // 2] for i in range(6)])
    with pytest.raises(ValueError, match="shard_index 2"):
        make_train_iterator(persons, H, W, batch_size=1, seed=0, shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_stream(persons):
    kwargs = dict(batch_size=2, seed=6, shard_index=0, shard_count=1)
    expected = batches(make_train_iterator(persons, H, W, **kwargs), 3)
    assert_same(batches(make_train_iterator(persons, H, W, worker_count=1, read_threads=1, **kwargs), 3), expected)


@pytest.fixture()
def corrupt_persons(persons, tmp_path):
    """A good person, and one with a garbage image (every draw of it uses both its views)."""
    bad = tmp_path / "image" / "bad_1.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = persons[1].views[0]
    return [persons[0], Person("bad", (good, View(image=str(bad), pose_image=good.pose_image)))], str(bad)


def test_corrupt_image_error_names_the_file(corrupt_persons):
    people, bad = corrupt_persons
    it = make_train_iterator(people, H, W, batch_size=2, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(CorruptImageError, match="bad_1.png") as info:
        next(it)
    assert info.value.path == bad


def test_skip_corrupt_counts(corrupt_persons):
    people, _ = corrupt_persons
    it = make_train_iterator(people, H, W, batch_size=2, seed=0, shard_index=0, shard_count=1, skip_corrupt=True)
    for b in batches(it, 3):
        assert len(b["known"]) == 2
    # One of each epoch's two persons is skipped: 6 good examples took 6 epochs (the last maybe partly).
    assert it.skipped_corrupt in (5, 6)
    assert it.get_state()["skipped_corrupt"] == it.skipped_corrupt


def test_missing_file_is_corrupt_too(persons):
    person = Person("gone", (persons[0].views[0], View(image="/nonexistent/image/x.png", pose_image="/n/x.png")))
    with pytest.raises(CorruptImageError, match="/nonexistent/image/x.png"):
        next(make_train_iterator([person], H, W, batch_size=1, seed=0, shard_index=0, shard_count=1))


def test_view_size_must_be_multiple_of_64(persons):
    with pytest.raises(ValueError, match="not a multiple of 64"):
        make_train_iterator(persons, 96, 64, batch_size=1, seed=0, shard_index=0, shard_count=1)


def test_persons_with_one_view_are_left_out(persons):
    single = Person("single", persons[0].views[:1])
    with pytest.raises(ValueError, match="no person has two or more views"):
        make_train_iterator([single], H, W, batch_size=1, seed=0, shard_index=0, shard_count=1)


@pytest.mark.parametrize("scenario, view_ids, positions, known", [
    (1, (2, 0), (2, 2, 2, 0), (1, 1, 1, 0)),
    (2, (0, 1, 2, 3), (0, 1, 2, 3), (1, 0, 0, 0)),
    (3, (3, 2, 1, 0), (3, 2, 1, 0), (1, 1, 1, 0)),
])
def test_eval_scenarios(files, scenario, view_ids, positions, known):
    person = read_imagpose_json(files["test"].index_json)[0]
    ex = make_eval_example(person, scenario, H, W, view_ids)
    np.testing.assert_array_equal(ex["known"], np.array(known, bool))
    views, poses = slots(ex["grid"]), slots(ex["pose_grid"])
    masked = slots(masked_views(ex["grid"], ex["known"]))
    for s, i in enumerate(positions):
        image, pose = load_view(person.views[i], H, W, Crop())
        np.testing.assert_array_equal(to_uint8(views[s]), image)
        np.testing.assert_array_equal(np.rint(poses[s] * 255), pose)
        assert (masked[s] == (views[s] if known[s] else -1)).all()
    np.testing.assert_array_equal(ex["ref_pixels"], views[0])
    np.testing.assert_array_equal(ex["dino_pixels"], clip_preprocess(to_uint8(views[0])))
    assert make_eval_example(person, scenario, H, W, view_ids).keys() == ex.keys()


def test_eval_errors(persons):
    with pytest.raises(ValueError, match="scenario must be one of"):
        make_eval_example(persons[0], 4, H, W)
    with pytest.raises(ValueError, match="needs 4 distinct view ids"):
        make_eval_example(persons[0], 3, H, W, (0, 1, 1, 2))
    with pytest.raises(ValueError, match="has 4 views"):
        make_eval_example(persons[0], 1, H, W, (0, 9))
