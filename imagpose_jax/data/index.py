"""Readers of the two on-disk dataset formats into one in-memory index: persons -> views.

- IMAGPose JSON (the original's training index): a JSON list with one entry per person, each a
  list of image paths (absolute, or relative to the JSON file's folder); each image's pose
  rendering is the file at the same path with its ``image`` folder replaced by ``dwpose``.
- DeepFashion pose transfer: ``fasion-resize-annotation-{split}.csv`` rows
  ``name:keypoints_y:keypoints_x`` (header row first; lists of 18 ints, -1 missing) naming images
  in one folder; a person is the image name up to its last ``_`` (``..id0000262902_3back.jpg``).
  ``fasion-resize-pairs-{split}.csv`` holds ``from,to`` name pairs for evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict

import numpy as np

from imagpose_jax.data.pose import parse_deepfashion_keypoints

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataFormatError(ValueError):
    """A dataset file that exists but cannot be understood; the message names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """One image of a person, with its pose as a rendering file or as keypoints (one of the two)."""
    image: str
    pose_image: str | None = None
    keypoints: np.ndarray | None = None  # (18, 2) float32 (x, y) pixels of the image, -1 missing


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    views: tuple[View, ...]


def pose_path_for(image_path: str) -> str:
    """The original's pose-rendering path: the image path with its last ``image`` folder -> ``dwpose``."""
    parts = image_path.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "image":
            parts[i] = "dwpose"
            return "/".join(parts)
    raise DataFormatError(f"no 'image' folder in {image_path!r}: cannot locate its pose rendering")


def _person_name(image_path: str) -> str:
    """DeepFashion's identity: the file name without extension, up to its last ``_``."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return stem.rsplit("_", 1)[0]


def _check_exists(paths: list[str], source: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} (listed in {source!r}) does not exist")


def read_imagpose_json(path: str | os.PathLike, *, check_files: bool = True) -> list[Person]:
    """Read an IMAGPose training index (see the module docstring) into persons.

    With ``check_files``, every image and pose rendering must exist (``FileNotFoundError``).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path!r} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise DataFormatError(f"{path!r}: expected a list of persons, got {type(data).__name__}")
    root = os.path.dirname(os.path.abspath(path))
    persons = []
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or not entry or not all(isinstance(p, str) for p in entry):
            raise DataFormatError(f"{path!r}: person {i} is not a non-empty list of image paths: {entry!r:.200}")
        bad = [p for p in entry if not p.lower().endswith(IMAGE_EXTENSIONS)]
        if bad:
            raise DataFormatError(f"{path!r}: person {i} lists non-image files {bad[:3]}")
        images = [os.path.join(root, p) for p in entry]  # absolute paths stay as they are
        views = tuple(View(image=im, pose_image=pose_path_for(im)) for im in images)
        if check_files:
            _check_exists([p for v in views for p in (v.image, v.pose_image)], path)
        persons.append(Person(name=_person_name(images[0]), views=views))
    return persons


def read_deepfashion(annotations_csv: str | os.PathLike, image_dir: str | os.PathLike, *,
                     check_files: bool = True) -> list[Person]:
    """Read a DeepFashion annotation CSV into persons whose views carry keypoints.

    Persons come in order of first appearance, their views in row order. With ``check_files``,
    every image must exist in ``image_dir`` (``FileNotFoundError``).
    """
    path, image_dir = os.fspath(annotations_csv), os.fspath(image_dir)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    views: dict[str, list[View]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("name:")):
            continue
        fields = line.split(":")
        if len(fields) != 3:
            raise DataFormatError(f"{path!r} line {number}: expected name:keypoints_y:keypoints_x, "
                                  f"got {len(fields)} ':'-separated fields: {line!r:.200}")
        name, ys, xs = fields
        try:
            keypoints = parse_deepfashion_keypoints(ys, xs)
        except ValueError as err:
            raise DataFormatError(f"{path!r} line {number} ({name}): {err}") from err
        views[_person_name(name)].append(View(image=os.path.join(image_dir, name.strip()), keypoints=keypoints))
    if check_files:
        _check_exists([v.image for vs in views.values() for v in vs], path)
    return [Person(name=name, views=tuple(vs)) for name, vs in views.items()]


def read_deepfashion_pairs(pairs_csv: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a DeepFashion ``from,to`` pairs CSV (header row first) into (source, target) names."""
    path = os.fspath(pairs_csv)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.replace(" ", "") == "from,to"):
            continue
        fields = [s.strip() for s in line.split(",")]
        if len(fields) != 2 or not all(fields):
            raise DataFormatError(f"{path!r} line {number}: expected 'from,to', got {line!r:.200}")
        pairs.append((fields[0], fields[1]))
    return pairs
