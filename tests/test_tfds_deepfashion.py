"""The TFDS builder of DeepFashion's manual download (`data/tfds_deepfashion.py`, the `tfds` extra), built
without TensorFlow (array_record files) from a small fake manual folder; skipped without the extra."""
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from imagpose_jax.data.index import read_deepfashion, read_deepfashion_pairs  # noqa: E402
from imagpose_jax.data.synthetic import make_synthetic_dataset  # noqa: E402
from imagpose_jax.data.tfds_deepfashion import DeepFashionPose, find_image_dir  # noqa: E402


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """The DeepFashion layout: fasion-resize-{annotation,pairs}-{split}.csv, images in {split}/image/."""
    root = tmp_path_factory.mktemp("manual")
    make_synthetic_dataset(root, num_persons=4, poses_per_person=2, height=64, width=64, seed=0,
                           test_fraction=0.25)
    return str(root)


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def build(manual_dir, data_dir, config):
    builder = DeepFashionPose(data_dir=str(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def test_images(manual_dir, tmp_path):
    builder = build(manual_dir, tmp_path, "images")
    for split in ("train", "test"):
        image_dir = os.path.join(manual_dir, split, "image")
        assert find_image_dir(manual_dir, split) == image_dir
        views = {os.path.basename(v.image): (p.name, v) for p in read_deepfashion(
            os.path.join(manual_dir, f"fasion-resize-annotation-{split}.csv"), image_dir) for v in p.views}
        source = builder.as_data_source(split=split)
        assert len(source) == len(views) == builder.info.splits[split].num_examples
        seen = set()
        for example in source:
            name = text(example["name"])
            person, view = views[name]
            seen.add(name)
            assert text(example["person"]) == person
            np.testing.assert_array_equal(example["keypoints"], view.keypoints)
            np.testing.assert_array_equal(example["image"], np.asarray(Image.open(view.image).convert("RGB")))
        assert seen == set(views)


def test_pairs(manual_dir, tmp_path):
    builder = build(manual_dir, tmp_path, "pairs")
    pairs = read_deepfashion_pairs(os.path.join(manual_dir, "fasion-resize-pairs-test.csv"))
    source = builder.as_data_source(split="test")
    assert len(source) == len(pairs) > 0
    got = sorted((text(e["from_name"]), text(e["to_name"])) for e in source)
    assert got == sorted(pairs)
    example = source[0]
    assert example["from_image"].shape == example["to_image"].shape == (64, 64, 3)
    assert example["from_keypoints"].shape == (18, 2)


def test_missing_files_named(manual_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="MANUAL_DOWNLOAD_INSTRUCTIONS"):
        find_image_dir(str(tmp_path), "train")       # no annotation CSV
    csv = "fasion-resize-annotation-train.csv"
    with open(os.path.join(manual_dir, csv)) as f, open(tmp_path / csv, "w") as g:
        g.write(f.read())
    with pytest.raises(FileNotFoundError, match="is in none of"):
        find_image_dir(str(tmp_path), "train")       # the CSV without its images
