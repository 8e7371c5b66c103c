"""The synthetic pose-transfer dataset: deterministic bytes, person split, both on-disk formats."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.data.index import read_deepfashion, read_deepfashion_pairs, read_imagpose_json
from imagpose_jax.data.pose import render_pose
from imagpose_jax.data.synthetic import main, make_synthetic_dataset

ARGS = dict(num_persons=6, poses_per_person=3, height=64, width=64, seed=3, test_fraction=0.34)


def tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic_dataset(root, **ARGS)


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    root, _ = dataset
    make_synthetic_dataset(tmp_path / "again", **ARGS)
    first, second = tree_bytes(root), tree_bytes(tmp_path / "again")
    assert sorted(first) == sorted(second) and len(first) == 2 + 4 + 2 * 6 * 3
    assert all(first[k] == second[k] for k in first)


def test_other_seed_gives_other_images(dataset, tmp_path):
    root, _ = dataset
    make_synthetic_dataset(tmp_path / "other", **{**ARGS, "seed": 4})
    first, other = tree_bytes(root), tree_bytes(tmp_path / "other")
    images = [k for k in first if k.endswith(".png") and k in other]
    assert images and all(first[k] != other[k] for k in images)


def test_split_by_person(dataset):
    _, files = dataset
    train = read_imagpose_json(files["train"].index_json)
    test = read_imagpose_json(files["test"].index_json)
    assert (len(train), len(test)) == (4, 2)  # round(0.34 * 6) test persons
    names = [p.name for p in train + test]
    assert len(set(names)) == 6 and set(names) == {f"person{i:04d}" for i in range(6)}
    for split, persons in (("train", train), ("test", test)):
        for person in persons:
            assert len(person.views) == 3
            assert all(f"{os.sep}{split}{os.sep}image{os.sep}{person.name}_" in v.image for v in person.views)


def test_images_poses_and_keypoints_agree(dataset):
    _, files = dataset
    from_json = read_imagpose_json(files["train"].index_json)
    from_csv = read_deepfashion(files["train"].annotations_csv, files["train"].image_dir)
    assert [p.name for p in from_json] == [p.name for p in from_csv]
    for pj, pc in zip(from_json, from_csv):
        images = []
        for vj, vc in zip(pj.views, pc.views):
            assert os.path.samefile(vj.image, vc.image)
            image = np.asarray(Image.open(vj.image))
            assert image.shape == (64, 64, 3)
            images.append(image)
            pose = np.asarray(Image.open(vj.pose_image))
            np.testing.assert_array_equal(pose, render_pose(vc.keypoints, 64, 64))
            visible = vc.keypoints[(vc.keypoints >= 0).all(-1)]
            assert len(visible) >= 12 and (visible < 64).all()
        assert not np.array_equal(images[0], images[1])  # a person's poses differ


def test_pairs_are_within_a_person(dataset):
    _, files = dataset
    pairs = read_deepfashion_pairs(files["test"].pairs_csv)
    assert len(pairs) == 2 * 3 * 2  # ordered pairs of distinct images per person
    assert all(a != b and a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0] for a, b in pairs)


def test_index_json_paths_are_relative(dataset):
    _, files = dataset
    with open(files["train"].index_json) as f:
        entries = json.load(f)
    assert all(not os.path.isabs(p) and p.startswith("train/image/") for person in entries for p in person)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--num-persons", "2", "--poses-per-person", "2", "--height", "64",
                 "--width", "64", "--test-fraction", "0.5"]) == 0
    assert "train.json" in capsys.readouterr().out
    assert len(read_imagpose_json(tmp_path / "test.json")) == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="test_fraction"):
        make_synthetic_dataset(tmp_path, 4, 2, 64, 64, 0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        make_synthetic_dataset(tmp_path, 4, 1, 64, 64, 0, 0.5)


def test_backdrop_is_the_persons_own(dataset):
    """All of a person's images share one near-white backdrop (the top corners, beside the head, are pure
    backdrop); different persons have different ones."""
    _, files = dataset
    persons = read_imagpose_json(files["train"].index_json) + read_imagpose_json(files["test"].index_json)
    tops = []
    for person in persons:
        rows = [np.asarray(Image.open(v.image).convert("RGB"))[:4, np.r_[0:8, -8:0]].astype(int) for v in person.views]
        for row in rows[1:]:
            np.testing.assert_array_equal(row, rows[0], err_msg=person.name)
        assert rows[0].min() >= 0.75 * 255, f"{person.name}: backdrop not near-white"
        tops.append(rows[0])
    assert len({t.tobytes() for t in tops}) == len(persons)
