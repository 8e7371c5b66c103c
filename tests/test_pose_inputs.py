"""Pose inputs can't go blank or land in the wrong place (issue 15, item 5): OpenPose JSON keypoints are in the
pixels of the image they were taken from and are scaled to the view as that image is; normalised keypoints are
recognised with a tolerance; too few visible points is an error naming the file. (Before: JSON keypoints were
drawn as view pixels, so a 512-px photo's pose on a 64-px view drew a fragment or nothing, silently.)"""
import json

import numpy as np
import pytest

from imagpose_jax.data.pose import keypoints_to_view, render_pose
from imagpose_jax.pose_extract import openpose_json
from imagpose_jax.sampling.pipeline import pose_view

RNG = np.random.default_rng(0)
KP512 = np.stack([RNG.uniform(100, 400, 18), RNG.uniform(50, 500, 18)], -1)        # a pose in a 400x512 (WxH) photo


def _json(tmp_path, kp, canvas=None, conf=None, name="p.json"):
    conf = np.ones(18) if conf is None else conf
    data = openpose_json(np.concatenate([kp, conf[:, None]], -1), *(canvas or (1, 1)))
    if canvas is None:
        del data["canvas_width"], data["canvas_height"]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_json_from_a_photo_is_scaled_by_its_canvas(tmp_path):
    path = _json(tmp_path, KP512, canvas=(400, 512))
    got = pose_view(path, 64, 48)
    want = render_pose(KP512 * (48 / 400, 64 / 512), 64, 48).astype(np.float32) / 255
    np.testing.assert_array_equal(got, want)
    assert got.max() > 0.5 and (got.sum(-1) > 0).mean() > 0.05    # a whole figure, not a fragment


def test_json_without_canvas_takes_the_source_photos_frame(tmp_path):
    path = _json(tmp_path, KP512)
    want = render_pose(KP512 * (48 / 400, 64 / 512), 64, 48).astype(np.float32) / 255
    np.testing.assert_array_equal(pose_view(path, 64, 48, frame=(400, 512)), want)
    with pytest.raises(ValueError, match="beyond the 48x64 view.*canvas_width"):   # no frame known: not silent
        pose_view(path, 64, 48)


def test_normalised_keypoints_tolerate_points_just_outside(tmp_path):
    kp = KP512 / (400, 512)
    kp[10] = (0.5, 1.02)                                    # a foot just out of frame
    got = keypoints_to_view(kp, 64, 48)
    np.testing.assert_allclose(got[:10], kp[:10] * (48, 64), rtol=1e-6)
    assert (got[10] == -1).all()                              # off the view: missing, not read as pixels
    np.testing.assert_array_equal(pose_view(_json(tmp_path, kp), 64, 48),
                                  render_pose(got, 64, 48).astype(np.float32) / 255)


@pytest.mark.parametrize("case", ["all_nan", "all_zero_confidence", "all_off_canvas", "two_points"])
def test_blank_poses_are_errors_naming_the_file(tmp_path, case):
    kp, conf = KP512.copy(), np.ones(18)
    if case == "all_nan":
        kp[:] = np.nan
    elif case == "all_zero_confidence":
        conf[:] = 0
    elif case == "all_off_canvas":
        kp += 10_000
    else:
        conf[2:] = 0
    path = _json(tmp_path, kp, canvas=(400, 512), conf=conf, name=f"{case}.json")
    with pytest.raises(ValueError, match=f"{case}.json: only [0-2] of 18 keypoints are visible"):
        pose_view(path, 64, 48)
