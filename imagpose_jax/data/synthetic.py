"""Procedural pose-transfer data: 2-D articulated figures in many poses, in the real data's formats.

Each person has fixed proportions, skin and hair colours and an outfit (a shirt textured with
stripes, checks or dots in its own two colours, trousers, shoes) and is drawn from an 18-keypoint
skeleton in random plausible poses: joint angles around a standing pose, a front or back view,
small scale and position jitter, in front of the person's own near-white backdrop (plain, a vertical gradient
or faint stripes; the same in all of that person's images, as in DeepFashion's studio shots).

Layout written under ``out_dir`` (both the original IMAGPose training index and DeepFashion's
pose-transfer annotations, so that either reader in ``index`` can load it)::

    {split}.json                           list of persons, each a list of image paths (relative
                                           to out_dir), the original's training index format
    {split}/image/personNNNN_KK.png        the images
    {split}/dwpose/personNNNN_KK.png       their pose renderings (the '/image/' -> '/dwpose/' rule)
    fasion-resize-annotation-{split}.csv   name:keypoints_y:keypoints_x, 18 ints each, -1 missing
    fasion-resize-pairs-{split}.csv        from,to: every ordered pair of one person's images

``make_deepfashion_dataset`` writes the same persons in DeepFashion's own pose-transfer layout instead
(what the PIDM/PCDMs releases distribute; a stand-in for the real data in tests)::

    {split}/fashion{WOMEN|MEN}{Category}id{8 digits}{2 digits}_{view}{front|side|back|...}.jpg   (256x176)
    fasion-resize-annotation-{split}.csv   name:keypoints_y:keypoints_x, 18 ints each, -1 missing
    fasion-resize-pairs-{split}.csv        from,to: every ordered pair of one person's images

Persons, not images, are split between train and test. Everything is a function of the seed:
the same arguments give byte-identical files, and both layouts hold the same persons and poses.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from imagpose_jax.data.pose import NUM_KEYPOINTS, render_pose

# Keypoint indices (see pose.KEYPOINT_NAMES).
NOSE, NECK, R_SHO, R_ELB, R_WRI, L_SHO, L_ELB, L_WRI = range(8)
R_HIP, R_KNEE, R_ANK, L_HIP, L_KNEE, L_ANK, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)

_SKIN = np.array([[255, 224, 196], [234, 192, 160], [198, 142, 102], [141, 85, 54], [92, 58, 40]], np.float32)
_HAIR = np.array([[30, 24, 20], [80, 50, 30], [150, 100, 50], [220, 190, 120], [120, 120, 120]], np.float32)
_TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots")
_BODY_SPAN = (-0.48, 0.45)  # top of the head and the ankles' y in body units (mid-hip = 0)


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """Paths of one split's files."""
    index_json: str
    annotations_csv: str
    pairs_csv: str
    image_dir: str
    pose_dir: str


@dataclasses.dataclass(frozen=True)
class DeepFashionFiles:
    """Paths of one split's files in DeepFashion's layout."""
    annotations_csv: str
    pairs_csv: str
    image_dir: str


@dataclasses.dataclass(frozen=True)
class _Person:
    """A person's fixed appearance; lengths in body units (about 0.93 from head top to ankle)."""
    skin: np.ndarray       # (3,) RGB 0-255
    hair: np.ndarray
    shirt: np.ndarray      # (2, 3) the texture's two colours
    trousers: np.ndarray
    shoes: np.ndarray
    texture: str
    period: float          # texture period
    long_sleeves: bool
    width: float           # girth factor
    backdrop: tuple        # the _background arguments: kind, colours (2, 3), stripe period (fraction of the width)


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return np.array(rgb, np.float32) * 255


def _sample_person(rng: np.random.Generator) -> _Person:
    return _Person(
        skin=_SKIN[rng.integers(len(_SKIN))], hair=_HAIR[rng.integers(len(_HAIR))],
        shirt=np.stack([_colour(rng, (0.3, 0.9), (0.35, 0.95)), _colour(rng, (0.0, 0.6), (0.6, 1.0))]),
        trousers=_colour(rng, (0.1, 0.7), (0.15, 0.7)), shoes=_colour(rng, (0.0, 0.4), (0.05, 0.4)),
        texture=_TEXTURES[rng.integers(len(_TEXTURES))], period=rng.uniform(0.035, 0.07),
        long_sleeves=bool(rng.random() < 0.5), width=rng.uniform(0.85, 1.15), backdrop=_sample_backdrop(rng),
    )


def _rot(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s], [s, c]])


def _down(deg: float, side: float) -> np.ndarray:
    """Unit vector at ``deg`` from straight down, turned outward towards ``side`` (-1 left, +1 right)."""
    return np.array([side * np.sin(np.radians(deg)), np.cos(np.radians(deg))])


def _sample_skeleton(rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """A random standing-ish pose: (18, 2) keypoints in body units (mid-hip at 0, y down), back view?"""
    back = bool(rng.random() < 0.2)
    # Image-x side of the person's right and left: the right is on the image's left when facing us.
    sides = {"r": 1.0 if back else -1.0, "l": -1.0 if back else 1.0}
    kp = np.zeros((NUM_KEYPOINTS, 2))
    lean = _rot(rng.normal(0, 4))
    kp[NECK] = lean @ [0.0, -0.30]
    for tag, sho, elb, wri, hip, knee, ank in (("r", R_SHO, R_ELB, R_WRI, R_HIP, R_KNEE, R_ANK),
                                               ("l", L_SHO, L_ELB, L_WRI, L_HIP, L_KNEE, L_ANK)):
        s = sides[tag]
        upper = float(np.clip(15 + rng.normal(0, 35), -40, 170))
        fore = upper + float(np.clip(rng.normal(0, 40), -140, 90))
        kp[sho] = kp[NECK] + lean @ [s * 0.10, 0.01]
        kp[elb] = kp[sho] + 0.15 * (lean @ _down(upper, s))
        kp[wri] = kp[elb] + 0.13 * (lean @ _down(fore, s))
        thigh = float(np.clip(4 + rng.normal(0, 10), -20, 40))
        shin = thigh + float(np.clip(rng.normal(0, 10), -30, 30))
        kp[hip] = [s * 0.065, 0.0]
        kp[knee] = kp[hip] + 0.22 * _down(thigh, s)
        kp[ank] = kp[knee] + 0.22 * _down(shin, s)
    head = lean @ _rot(rng.normal(0, 8))
    kp[NOSE] = kp[NECK] + head @ [0.0, -0.09]
    for tag, eye, ear in (("r", R_EYE, R_EAR), ("l", L_EYE, L_EAR)):
        kp[eye] = kp[NOSE] + head @ [sides[tag] * 0.025, -0.025]
        kp[ear] = kp[NOSE] + head @ [sides[tag] * 0.05, -0.01]
    return kp, back


class _Canvas:
    """Float RGB image with anti-aliased distance-field shapes composited on top."""

    def __init__(self, background: np.ndarray):
        self.rgb = background.copy()  # (H, W, 3) float32 0-255
        h, w = background.shape[:2]
        self.y, self.x = np.mgrid[0:h, 0:w].astype(np.float32)

    def capsule(self, a: np.ndarray, b: np.ndarray, radius: float, colour: np.ndarray) -> None:
        """Segment a-b (pixels) thickened by ``radius``; colour (3,) or (H, W, 3)."""
        lo = np.floor(np.minimum(a, b) - radius - 1).astype(int).clip(0)
        hi = np.ceil(np.maximum(a, b) + radius + 2).astype(int)
        box = np.s_[lo[1]:hi[1], lo[0]:hi[0]]  # the shape's bounding box
        x, y = self.x[box], self.y[box]
        ab = b - a
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
        alpha = np.clip(radius + 0.5 - np.hypot(x - (a[0] + t * ab[0]), y - (a[1] + t * ab[1])), 0, 1)[..., None]
        if colour.ndim == 3:
            colour = colour[box]
        self.rgb[box] += (colour - self.rgb[box]) * alpha


def _sample_backdrop(rng: np.random.Generator) -> tuple:
    """A person's backdrop, near-white as DeepFashion's studio: 0 plain, 1 vertical gradient, 2 faint stripes."""
    colours = np.stack([_colour(rng, (0.0, 0.08), (0.86, 1.0)), _colour(rng, (0.0, 0.1), (0.78, 0.95))])
    return int(rng.integers(3)), colours, float(rng.uniform(0.05, 0.15))


def _background(backdrop: tuple, h: int, w: int) -> np.ndarray:
    """The backdrop drawn at (H, W): (H, W, 3) float32."""
    kind, colours, period = backdrop
    base = colours[0]
    if kind == 0:
        image = base
    elif kind == 1:
        ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        image = base * (1 - ramp) + colours[1] * ramp
    else:
        stripes = np.floor(np.arange(w) / (period * w)) % 2
        image = base * (1 - 0.06 * stripes[None, :, None])
    return np.broadcast_to(image, (h, w, 3)).astype(np.float32)


def _shirt_pattern(person: _Person, canvas: _Canvas, origin: np.ndarray, scale: float) -> np.ndarray:
    """The shirt's texture anchored at ``origin`` (the neck) in body units: (H, W, 3)."""
    u = (canvas.x - origin[0]) / (scale * person.period)
    v = (canvas.y - origin[1]) / (scale * person.period)
    if person.texture == "plain":
        second = np.zeros_like(u)
    elif person.texture == "hstripes":
        second = np.floor(v) % 2
    elif person.texture == "vstripes":
        second = np.floor(u) % 2
    elif person.texture == "checks":
        second = (np.floor(u) + np.floor(v)) % 2
    else:  # dots
        second = (((u % 1) - 0.5) ** 2 + ((v % 1) - 0.5) ** 2 < 0.09).astype(np.float32)
    second = second[..., None]
    return person.shirt[0] * (1 - second) + person.shirt[1] * second


def _draw(person: _Person, kp: np.ndarray, back: bool, background: np.ndarray, scale: float) -> np.ndarray:
    """Draw the figure from pixel keypoints ``kp`` (18, 2): (H, W, 3) uint8."""
    c = _Canvas(background)
    g = person.width * scale
    mid_hip = (kp[R_HIP] + kp[L_HIP]) / 2
    shirt = _shirt_pattern(person, c, kp[NECK], scale)
    for hip, knee, ank in ((R_HIP, R_KNEE, R_ANK), (L_HIP, L_KNEE, L_ANK)):
        c.capsule(kp[hip], kp[knee], 0.048 * g, person.trousers)
        c.capsule(kp[knee], kp[ank], 0.037 * g, person.trousers * 0.92)
        c.capsule(kp[ank], kp[ank] + [0.0, 0.02 * scale], 0.03 * g, person.shoes)
    c.capsule(kp[R_HIP], kp[L_HIP], 0.06 * g, person.trousers)
    c.capsule(kp[NECK], kp[NOSE], 0.025 * g, person.skin * 0.9)
    c.capsule(kp[NECK], mid_hip, 0.085 * g, shirt)
    c.capsule(kp[R_SHO], kp[L_SHO], 0.035 * g, shirt)
    for sho, elb, wri in ((R_SHO, R_ELB, R_WRI), (L_SHO, L_ELB, L_WRI)):
        c.capsule(kp[sho], kp[elb], 0.032 * g, shirt * 0.88)
        c.capsule(kp[elb], kp[wri], 0.027 * g, shirt * 0.8 if person.long_sleeves else person.skin)
        c.capsule(kp[wri], kp[wri], 0.03 * g, person.skin)
    head = kp[NOSE] + (kp[NOSE] - kp[NECK]) * 0.25
    c.capsule(head, head, 0.065 * scale, person.hair)
    if not back:
        face = head + (kp[NECK] - kp[NOSE]) * 0.15
        c.capsule(face, face, 0.05 * scale, person.skin)
    return np.clip(np.rint(c.rgb), 0, 255).astype(np.uint8)


def _sample_view(person: _Person, rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``person`` in a random pose: (H, W, 3) uint8 and (18, 2) int keypoints, -1 missing."""
    body, back = _sample_skeleton(rng)
    scale = 0.88 * h / (_BODY_SPAN[1] - _BODY_SPAN[0]) * rng.uniform(0.9, 1.05)
    centre = np.array([w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.04, 0.04) * h])
    kp = centre + (body - [0.0, sum(_BODY_SPAN) / 2]) * scale
    image = _draw(person, kp, back, _background(person.backdrop, h, w), scale)
    kp_int = np.rint(kp).astype(np.int64)
    hidden = np.zeros(NUM_KEYPOINTS, bool)
    if back:
        hidden[[NOSE, R_EYE, L_EYE]] = True
    else:
        hidden[[R_EAR, L_EAR]] = rng.random(2) < 0.2
    outside = (kp_int[:, 0] < 0) | (kp_int[:, 0] >= w) | (kp_int[:, 1] < 0) | (kp_int[:, 1] >= h)
    kp_int[hidden | outside] = -1
    return image, kp_int


def _int_list(values: np.ndarray) -> str:
    return "[" + ", ".join(str(int(v)) for v in values) + "]"


def _split_persons(num_persons: int, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Person ids of each split; the test split gets round(fraction * n) persons, at least one."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    num_test = min(max(round(test_fraction * num_persons), int(test_fraction > 0)), num_persons - 1)
    order = np.random.default_rng([seed, 0]).permutation(num_persons)
    return {"train": sorted(order[num_test:].tolist()), "test": sorted(order[:num_test].tolist())}


def _person_views(pid: int, poses_per_person: int, height: int, width: int,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Person ``pid``'s images and keypoints: (H, W, 3) uint8 and (18, 2) int (x, y), -1 missing."""
    rng = np.random.default_rng([seed, 1, pid])
    person = _sample_person(rng)
    for _ in range(poses_per_person):
        yield _sample_view(person, rng, height, width)


def _check_counts(num_persons: int, poses_per_person: int) -> None:
    if num_persons < 2 or poses_per_person < 2:
        raise ValueError(f"need at least 2 persons and 2 poses per person, got {num_persons}, {poses_per_person}")


def _write_csvs(annotations_csv: str, pairs_csv: str, rows: list[str], persons: list[list[str]]) -> None:
    """The annotation CSV (``rows``: name:keypoints_y:keypoints_x) and the pairs CSV (every ordered pair of
    distinct images of each person in ``persons``, lists of image names)."""
    pairs = [f"{a},{b}" for names in persons for a in names for b in names if a != b]
    for path, lines in ((annotations_csv, ["name:keypoints_y:keypoints_x"] + rows), (pairs_csv, ["from,to"] + pairs)):
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def make_synthetic_dataset(out_dir: str | os.PathLike, num_persons: int = 64, poses_per_person: int = 8,
                           height: int = 128, width: int = 128, seed: int = 0,
                           test_fraction: float = 0.1) -> dict[str, SplitFiles]:
    """Write a synthetic pose-transfer dataset under ``out_dir`` (layout in the module docstring).

    Returns the files of each split, ``{"train": SplitFiles, "test": SplitFiles}``.
    """
    _check_counts(num_persons, poses_per_person)
    root = os.fspath(out_dir)
    files = {}
    for split, ids in _split_persons(num_persons, test_fraction, seed).items():
        for sub in ("image", "dwpose"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        index, annotations, persons = [], [], []
        for pid in ids:
            names = [f"person{pid:04d}_{k:02d}.png" for k in range(poses_per_person)]
            for name, (image, kp) in zip(names, _person_views(pid, poses_per_person, height, width, seed)):
                Image.fromarray(image).save(os.path.join(root, split, "image", name))
                Image.fromarray(render_pose(kp, height, width)).save(os.path.join(root, split, "dwpose", name))
                annotations.append(f"{name}:{_int_list(kp[:, 1])}:{_int_list(kp[:, 0])}")
            index.append([f"{split}/image/{name}" for name in names])
            persons.append(names)
        files[split] = SplitFiles(
            index_json=os.path.join(root, f"{split}.json"),
            annotations_csv=os.path.join(root, f"fasion-resize-annotation-{split}.csv"),
            pairs_csv=os.path.join(root, f"fasion-resize-pairs-{split}.csv"),
            image_dir=os.path.join(root, split, "image"), pose_dir=os.path.join(root, split, "dwpose"))
        with open(files[split].index_json, "w") as f:
            json.dump(index, f, indent=1)
        _write_csvs(files[split].annotations_csv, files[split].pairs_csv, annotations, persons)
    return files


# DeepFashion In-shop names: fashion + gender + category + "id" + the 8-digit product id + the 2-digit item,
# then "_" + the view's number and name (img/MEN/Denim/id_00000080/01_1_front.jpg, flattened).
DEEPFASHION_CATEGORIES = (("WOMEN", "Blouses_Shirts"), ("MEN", "Denim"), ("WOMEN", "Dresses"), ("MEN", "Tees_Tanks"),
                          ("WOMEN", "Skirts"), ("MEN", "Shirts_Polos"), ("WOMEN", "Jackets_Coats"))
DEEPFASHION_VIEWS = ("front", "side", "full", "additional")  # and "back" for the views from behind


def deepfashion_name(pid: int, view: int, back: bool) -> str:
    """``fashionMENDenimid0000000202_3back.jpg``-style name of person ``pid``'s ``view``-th image (from 0)."""
    gender, category = DEEPFASHION_CATEGORIES[pid % len(DEEPFASHION_CATEGORIES)]
    kind = "back" if back else DEEPFASHION_VIEWS[view % len(DEEPFASHION_VIEWS)]
    return f"fashion{gender}{category}id{pid + 1:08d}{1 + pid % 3:02d}_{view + 1}{kind}.jpg"


def make_deepfashion_dataset(out_dir: str | os.PathLike, num_persons: int = 64, poses_per_person: int = 8,
                             height: int = 256, width: int = 176, seed: int = 0,
                             test_fraction: float = 0.1) -> dict[str, DeepFashionFiles]:
    """Write the synthetic persons in DeepFashion's pose-transfer layout (module docstring) under ``out_dir``:
    JPEGs (quality 95) at DeepFashion's 256x176, the annotation and pairs CSVs of both splits in their exact
    formats (``index.read_deepfashion``, ``read_deepfashion_pairs`` and the TFDS builder read them). The same
    arguments give the persons, poses and keypoints of ``make_synthetic_dataset``; keypoints outside the image
    or hidden (the face from behind, some ears) are -1.

    Returns the files of each split, ``{"train": DeepFashionFiles, "test": DeepFashionFiles}``.
    """
    _check_counts(num_persons, poses_per_person)
    root = os.fspath(out_dir)
    files = {}
    for split, ids in _split_persons(num_persons, test_fraction, seed).items():
        files[split] = DeepFashionFiles(annotations_csv=os.path.join(root, f"fasion-resize-annotation-{split}.csv"),
                                        pairs_csv=os.path.join(root, f"fasion-resize-pairs-{split}.csv"),
                                        image_dir=os.path.join(root, split))
        os.makedirs(files[split].image_dir, exist_ok=True)
        annotations, persons = [], []
        for pid in ids:
            names = []
            for k, (image, kp) in enumerate(_person_views(pid, poses_per_person, height, width, seed)):
                name = deepfashion_name(pid, k, back=bool((kp[[NOSE, R_EYE, L_EYE]] < 0).all()))
                Image.fromarray(image).save(os.path.join(files[split].image_dir, name), quality=95)
                annotations.append(f"{name}:{_int_list(kp[:, 1])}:{_int_list(kp[:, 0])}")
                names.append(name)
            persons.append(names)
        _write_csvs(files[split].annotations_csv, files[split].pairs_csv, annotations, persons)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a synthetic dataset and print where its splits are."""
    parser = argparse.ArgumentParser(prog="imagpose make-dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--format", choices=("imagpose", "deepfashion"), default="imagpose",
                        help="imagpose: the IMAGPose JSON index with pose renderings (and the CSVs); deepfashion: "
                             "DeepFashion's pose-transfer layout (DeepFashion names, 256x176 JPEGs, the CSVs)")
    parser.add_argument("--num-persons", type=int, default=64)
    parser.add_argument("--poses-per-person", type=int, default=8)
    parser.add_argument("--height", type=int, help="default 128 (imagpose) or 256 (deepfashion)")
    parser.add_argument("--width", type=int, help="default 128 (imagpose) or 176 (deepfashion)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    deepfashion = args.format == "deepfashion"
    make = make_deepfashion_dataset if deepfashion else make_synthetic_dataset
    files = make(args.out_dir, args.num_persons, args.poses_per_person, args.height or (256 if deepfashion else 128),
                 args.width or (176 if deepfashion else 128), args.seed, args.test_fraction)
    for split, f in files.items():
        print(f"{split}: {f.annotations_csv} ({f.pairs_csv}, images in {f.image_dir})" if deepfashion
              else f"{split}: {f.index_json} ({f.annotations_csv}, {f.pairs_csv})")
    return 0
