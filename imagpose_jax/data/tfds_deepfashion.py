"""A TFDS builder for DeepFashion's pose-transfer data (In-shop Clothes, PATN/PIDM split), manual download.

Needs the `tfds` extra (`pip install -e .[tfds]`); building and reading work without TensorFlow with
`file_format="array_record"` (images are stored as the files' own bytes, decoded with PIL on reading):

    from imagpose_jax.data.tfds_deepfashion import DeepFashionPose
    import tensorflow_datasets as tfds
    builder = DeepFashionPose(data_dir="~/tensorflow_datasets", config="images", file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/deepfashion"))
    source = builder.as_data_source(split="train")   # random access, e.g. for grain.MapDataset.source

The manual-download folder holds, per split (train, test), what the pose-transfer papers distribute:

    fasion-resize-annotation-{split}.csv   name:keypoints_y:keypoints_x (18 OpenPose points, -1 missing)
    fasion-resize-pairs-{split}.csv        from,to image-name pairs (evaluation)
    the images, in one of {split}/, {split}/image/, {split}_highres/, img/ (the first holding them)

The CSVs are parsed by `index.read_deepfashion` / `index.read_deepfashion_pairs`, the same readers the
training pipeline uses. Configs: "images" (one example per image: the image, its name, the person and the
keypoints, persons in order of first appearance) and "pairs" (one example per from/to pair).
"""
from __future__ import annotations

import os

import numpy as np

try:
    import tensorflow_datasets as tfds
except ImportError as err:  # pragma: no cover - the optional extra
    raise ImportError("imagpose_jax.data.tfds_deepfashion needs tensorflow-datasets: "
                      "pip install -e '.[tfds]'") from err

from imagpose_jax.data.index import read_deepfashion, read_deepfashion_pairs
from imagpose_jax.data.pose import NUM_KEYPOINTS

SPLITS = ("train", "test")
IMAGE_DIRS = ("{split}", "{split}/image", "{split}_highres", "img")


def annotations_csv(manual_dir: str, split: str) -> str:
    return os.path.join(manual_dir, f"fasion-resize-annotation-{split}.csv")


def pairs_csv(manual_dir: str, split: str) -> str:
    return os.path.join(manual_dir, f"fasion-resize-pairs-{split}.csv")


def find_image_dir(manual_dir: str, split: str) -> str:
    """The first of IMAGE_DIRS (under manual_dir) holding the split's first annotated image."""
    first = _first_image_name(annotations_csv(manual_dir, split))
    tried = []
    for pattern in IMAGE_DIRS:
        folder = os.path.join(manual_dir, pattern.format(split=split))
        if os.path.isfile(os.path.join(folder, first)):
            return folder
        tried.append(folder)
    raise FileNotFoundError(f"{first!r} (the first image of {annotations_csv(manual_dir, split)!r}) is in none "
                            f"of {tried}")


def _first_image_name(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: see DeepFashionPose.MANUAL_DOWNLOAD_INSTRUCTIONS")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip() and not (number == 1 and line.startswith("name:")):
                return line.split(":", 1)[0].strip()
    raise FileNotFoundError(f"{path!r} lists no image")


class DeepFashionPose(tfds.core.GeneratorBasedBuilder):
    """DeepFashion In-shop Clothes pose-transfer split (PATN/PIDM annotations); manual download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images with 18 OpenPose keypoints; from/to evaluation pairs."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="images", description="one example per image, with its keypoints"),
        tfds.core.BuilderConfig(name="pairs", description="one example per from/to pair of the pairs CSV"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put in the manual folder, for each split (train, test): fasion-resize-annotation-{split}.csv,
    fasion-resize-pairs-{split}.csv (from the pose-transfer papers' releases, e.g. PATN / PIDM) and the
    split's images (DeepFashion In-shop Clothes, resized as those releases say) in {split}/ (or
    {split}/image/, {split}_highres/, img/), named as in the CSVs.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        keypoints = tfds.features.Tensor(shape=(NUM_KEYPOINTS, 2), dtype=np.float32)
        image = tfds.features.Image(shape=(None, None, 3))
        if self.builder_config.name == "images":
            features = {"image": image, "name": tfds.features.Text(), "person": tfds.features.Text(),
                        "keypoints": keypoints}
        else:
            features = {f"{side}_{key}": feature for side in ("from", "to")
                        for key, feature in (("image", image), ("name", tfds.features.Text()),
                                             ("keypoints", keypoints))}
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
            description="DeepFashion pose transfer; keypoints are (x, y) pixels of the image, -1 where missing.")

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(manual_dir, split) for split in SPLITS
                if os.path.isfile(annotations_csv(manual_dir, split))}

    def _generate_examples(self, manual_dir: str, split: str):
        image_dir = find_image_dir(manual_dir, split)
        persons = read_deepfashion(annotations_csv(manual_dir, split), image_dir)
        if self.builder_config.name == "images":
            for person in persons:
                for view in person.views:
                    name = os.path.basename(view.image)
                    yield name, {"image": view.image, "name": name, "person": person.name,
                                 "keypoints": view.keypoints}
            return
        views = {os.path.basename(v.image): v for p in persons for v in p.views}
        for number, (source, target) in enumerate(read_deepfashion_pairs(pairs_csv(manual_dir, split))):
            missing = [n for n in (source, target) if n not in views]
            if missing:
                raise ValueError(f"{pairs_csv(manual_dir, split)!r} pair {number}: {missing} not in "
                                 f"{annotations_csv(manual_dir, split)!r}")
            example = {}
            for side, name in (("from", source), ("to", target)):
                example.update({f"{side}_image": views[name].image, f"{side}_name": name,
                                f"{side}_keypoints": views[name].keypoints})
            yield f"{number}:{source}:{target}", example
