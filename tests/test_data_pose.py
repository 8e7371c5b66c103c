"""Pose rendering in the OpenPose body style, and the keypoint file readers."""
import json
import math

import numpy as np
import pytest

from imagpose_jax.data.pose import (COLORS, LIMBS, load_openpose_json, parse_deepfashion_keypoints,
                                    render_pose)

# A spread-out skeleton on a 256 x 256 canvas: arms out sideways, legs apart, no limbs crossing.
SKELETON = np.array([
    [128, 40], [128, 70], [98, 72], [60, 76], [22, 80], [158, 72], [196, 76], [234, 80],
    [108, 150], [96, 195], [86, 240], [148, 150], [160, 195], [170, 240],
    [120, 32], [136, 32], [108, 38], [148, 38],
], dtype=np.float32)


def dimmed(colour):
    return (np.array(colour) * 0.6).astype(np.uint8)


@pytest.mark.parametrize("limb", range(len(LIMBS)))
def test_limb_alone_is_dimmed_palette_colour_with_full_colour_dots(limb):
    a, b = LIMBS[limb]
    kp = np.full((18, 2), -1.0, np.float32)
    kp[[a, b]] = SKELETON[[a, b]]
    out = render_pose(kp, 256, 256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    mid = np.round((SKELETON[a] + SKELETON[b]) / 2).astype(int)
    np.testing.assert_array_equal(out[mid[1], mid[0]], dimmed(COLORS[limb]))
    for k in (a, b):
        x, y = SKELETON[k].astype(int)
        np.testing.assert_array_equal(out[y, x], COLORS[k])
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= {(0, 0, 0), tuple(dimmed(COLORS[limb])), tuple(COLORS[a]), tuple(COLORS[b])}


def test_full_skeleton_limb_midpoints():
    out = render_pose(SKELETON, 256, 256)
    for limb, (a, b) in enumerate(LIMBS):
        if limb in (13, 14, 15, 16):  # face limbs are shorter than the dots that cover them
            continue
        mid = np.round((SKELETON[a] + SKELETON[b]) / 2).astype(int)
        np.testing.assert_array_equal(out[mid[1], mid[0]], dimmed(COLORS[limb]), err_msg=f"limb {limb}")


def test_dot_is_opencv_radius_4_disc():
    kp = np.full((18, 2), -1.0)
    kp[7] = [20, 20]
    out = render_pose(kp, 41, 41)
    mask = np.all(out == COLORS[7], axis=-1)
    assert mask.sum() == 49  # rows of 1, 5, 7, 7, 9, 7, 7, 5, 1 pixels
    np.testing.assert_array_equal(mask.sum(axis=1)[16:25], [1, 5, 7, 7, 9, 7, 7, 5, 1])


def test_missing_keypoint_removes_its_dot_and_limbs():
    kp = SKELETON.copy()
    kp[3] = -1  # right elbow: limbs 2 (shoulder-elbow) and 3 (elbow-wrist) go too
    out = render_pose(kp, 256, 256)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    for gone in (tuple(dimmed(COLORS[2])), tuple(dimmed(COLORS[3])), tuple(COLORS[3])):
        assert gone not in colours
    assert tuple(COLORS[2]) in colours and tuple(COLORS[4]) in colours  # shoulder and wrist dots stay
    x, y = SKELETON[3].astype(int)
    assert not out[y - 6:y + 7, x - 6:x + 7].any()


def test_all_missing_or_nan_is_black():
    assert not render_pose(np.full((18, 2), -1.0), 64, 48).any()
    assert not render_pose(np.full((18, 2), np.nan), 64, 48).any()


def test_normalized_equals_pixels():
    norm = np.where(SKELETON >= 0, SKELETON / 256.0, -1)
    np.testing.assert_array_equal(render_pose(norm, 256, 256, normalized=True), render_pose(SKELETON, 256, 256))


def test_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"\(18, 2\)"):
        render_pose(np.zeros((17, 2)), 64, 64)


def test_matches_opencv_drawing():
    """The original's cv2 drawing, where cv2 happens to be installed (it is no dependency)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    differing = drawn = 0
    for _ in range(50):
        kp = np.stack([rng.uniform(0, 96, 18), rng.uniform(0, 128, 18)], -1)
        kp[rng.random(18) < 0.15] = -1
        ref = np.zeros((128, 96, 3), np.uint8)
        for i, (a, b) in enumerate(LIMBS):
            if (kp[[a, b]] < 0).any():
                continue
            (xa, ya), (xb, yb) = kp[a], kp[b]
            poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)),
                                    (int(math.hypot(xa - xb, ya - yb) / 2), 4),
                                    int(math.degrees(math.atan2(ya - yb, xa - xb))), 0, 360, 1)
            cv2.fillConvexPoly(ref, poly, COLORS[i])
        ref = (ref * 0.6).astype(np.uint8)
        for i in np.flatnonzero((kp >= 0).all(-1)):
            cv2.circle(ref, (int(kp[i, 0]), int(kp[i, 1])), 4, COLORS[i], thickness=-1)
        out = render_pose(kp, 128, 96)
        differing += np.any(out != ref, -1).sum()
        drawn += np.any(ref > 0, -1).sum()
    assert differing <= 1e-3 * drawn  # polygon edge pixels may round differently


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_openpose_json(tmp_path):
    flat = np.arange(54, dtype=float).reshape(18, 3)
    flat[:, 2] = 0.9
    flat[5] = [0, 0, 0]  # OpenPose writes undetected points as zeros
    kp = load_openpose_json(write_json(tmp_path / "p.json", {"people": [{"pose_keypoints_2d": flat.ravel().tolist()}]}))
    assert kp.shape == (18, 2) and kp.dtype == np.float32
    np.testing.assert_array_equal(kp[0], [0, 1])
    np.testing.assert_array_equal(kp[17], [51, 52])
    np.testing.assert_array_equal(kp[5], [-1, -1])


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read OpenPose JSON"),
    (json.dumps({"people": []}), "has no people"),
    (json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 75}]}), "has 75 values, expected 54"),
    (json.dumps({"people": [{"face": []}]}), "no pose_keypoints_2d"),
])
def test_load_openpose_json_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_openpose_json(path)
    assert str(path) in str(info.value)


def test_load_openpose_json_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        load_openpose_json(tmp_path / "nope.json")


def test_parse_deepfashion_keypoints():
    ys = "[34, 54, 53, 95, 132, 54, 96, 134, 137, 196, 249, 137, 196, 249, 29, 29, -1, 32]"
    xs = "[91, 93, 65, 59, 58, 121, 126, 128, 76, 78, 79, 111, 111, 114, 86, 97, 79, -1]"
    kp = parse_deepfashion_keypoints(ys, xs)
    assert kp.shape == (18, 2) and kp.dtype == np.float32
    np.testing.assert_array_equal(kp[0], [91, 34])
    np.testing.assert_array_equal(kp[16], [-1, -1])  # y missing
    np.testing.assert_array_equal(kp[17], [-1, -1])  # x missing


@pytest.mark.parametrize("ys, message", [
    ("[1, 2, 3]", "keypoints_y has 3 values, expected 18"),
    ("[1.5] * 18", "keypoints_y is not a list of integers"),
    ("nonsense", "keypoints_y is not a list of integers"),
])
def test_parse_deepfashion_keypoints_errors(ys, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_deepfashion_keypoints(ys, str([0] * 18))
