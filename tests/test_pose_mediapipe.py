"""`imagpose pose --backend mediapipe`: MediaPipe 0.10.21's legacy pose landmarker in its own virtual environment, on
scikit-image's astronaut (an upper-body portrait, 512x512): the face and shoulders found where they are, the hips,
knees and ankles (below the frame) missing; the landmark -> OpenPose mapping on its own.

The environment: $IMAGPOSE_MEDIAPIPE_VENV names a ready one ("off" skips these tests); else it is created once under
~/.cache/imagpose-jax (`mediapipe_pose.create_venv`: ~25 s and 400 MB with the network; the tests skip, saying why,
when it cannot be)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.data import mediapipe_pose as mpp
from imagpose_jax.data.pose import KEYPOINT_NAMES

# Where things are in skimage.data.astronaut() (x, y pixel boxes read off the image: the face spans x 160-290,
# y 40-170; she faces the camera, so her right is the image's left).
EXPECTED = {"nose": ((205, 240), (115, 145)), "r_eye": ((185, 218), (92, 122)), "l_eye": ((232, 262), (98, 126)),
            "r_ear": ((160, 208), (92, 138)), "l_ear": ((252, 292), (100, 146)),
            "r_shoulder": ((85, 145), (212, 270)), "l_shoulder": ((278, 336), (225, 285))}
BELOW_THE_FRAME = ("r_hip", "l_hip", "r_knee", "l_knee", "r_ankle", "l_ankle")


@pytest.fixture(scope="session")
def mediapipe_venv():
    env = os.environ.get(mpp.VENV_ENV)
    if env == "off":
        pytest.skip(f"{mpp.VENV_ENV}=off: no MediaPipe environment")
    venv = mpp.default_venv()
    if env and not os.path.isfile(mpp.venv_python(env)):
        pytest.skip(f"{mpp.VENV_ENV}={env} holds no Python environment ({mpp.venv_python(env)} not found)")
    if not os.path.isfile(mpp.venv_python(venv)):
        start = time.perf_counter()
        try:
            mpp.create_venv(venv)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"no MediaPipe environment at {venv}, and creating it failed (offline?): {err}")
        print(f"created {venv} in {time.perf_counter() - start:.0f} s")
    return venv


@pytest.fixture(scope="module")
def astronaut():
    data = pytest.importorskip("skimage.data", reason="the test photo ships with scikit-image")
    return data.astronaut()


def test_astronaut_upper_body(mediapipe_venv, astronaut, tmp_path, capsys):
    assert astronaut.shape == (512, 512, 3)
    with mpp.MediaPipePose(mediapipe_venv) as backend:
        kp = backend(astronaut)
        lm = backend.landmarks(astronaut)
    np.testing.assert_array_equal(kp, mpp.landmarks_to_openpose(lm, 512, 512))
    at = dict(zip(KEYPOINT_NAMES, kp))
    for name, ((x0, x1), (y0, y1)) in EXPECTED.items():
        x, y, score = at[name]
        assert x0 <= x <= x1 and y0 <= y <= y1 and score >= 0.5, (name, at[name])
    assert at["r_ear"][0] < at["r_eye"][0] < at["nose"][0] < at["l_eye"][0] < at["l_ear"][0]
    np.testing.assert_allclose(at["neck"][:2], (at["r_shoulder"][:2] + at["l_shoulder"][:2]) / 2, atol=1e-3)
    assert at["neck"][2] == pytest.approx(min(at["r_shoulder"][2], at["l_shoulder"][2]), abs=1e-6)
    for name in BELOW_THE_FRAME:
        assert at[name].tolist() == [-1, -1, 0], (name, at[name])
    # MediaPipe placed the knees and ankles (its 25-28) below the photo, and saw the hips (23, 24) too weakly
    assert (lm[25:29, 1] > 1).all() and (lm[23:25, 3] < mpp.VISIBILITY_THR).all()

    # the command line writes the same pose
    from imagpose_jax.pose_extract import main
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(photo)
    assert main([str(photo), "--out", str(tmp_path / "poses"), "--backend", "mediapipe",
                 "--mediapipe-venv", mediapipe_venv]) == 0
    assert f"{int((kp[:, 2] > 0).sum())}/18 keypoints" in capsys.readouterr().out
    data = json.loads((tmp_path / "poses" / "astronaut_pose.json").read_text())
    flat = np.asarray(data["people"][0]["pose_keypoints_2d"], np.float32).reshape(18, 3)
    np.testing.assert_array_equal(flat, np.where(kp[:, 2:] > 0, kp, 0))


def test_landmarks_to_openpose():
    rng = np.random.default_rng(0)
    lm = np.concatenate([rng.uniform(0.05, 0.95, (33, 2)), rng.normal(0, 0.1, (33, 1)), np.full((33, 1), 0.9)], 1)
    w, h = 300, 400
    lm[13, 3] = 0.49          # left elbow: below the visibility threshold
    lm[27, 1] = 1.2           # left ankle: below the photo
    lm[30, 3] = 0.0           # a heel, unused
    kp = mpp.landmarks_to_openpose(lm, w, h)
    assert kp.shape == (18, 3) and kp.dtype == np.float32
    mediapipe_name = {0: "nose", 2: "l_eye", 5: "r_eye", 7: "l_ear", 8: "r_ear", 11: "l_shoulder", 12: "r_shoulder",
                      13: "l_elbow", 14: "r_elbow", 15: "l_wrist", 16: "r_wrist", 23: "l_hip", 24: "r_hip",
                      25: "l_knee", 26: "r_knee", 27: "l_ankle", 28: "r_ankle"}
    for j, name in mediapipe_name.items():
        i = KEYPOINT_NAMES.index(name)
        if j in (13, 27):
            assert kp[i].tolist() == [-1, -1, 0], name
        else:
            np.testing.assert_allclose(kp[i], (lm[j, 0] * w, lm[j, 1] * h, 0.9), rtol=1e-6, err_msg=name)
    neck = KEYPOINT_NAMES.index("neck")
    np.testing.assert_allclose(kp[neck, :2], (lm[11, :2] + lm[12, :2]) / 2 * (w, h), rtol=1e-6)
    lm[12, 0] = -0.01         # right shoulder off the photo's left edge: it and the neck are missing
    kp = mpp.landmarks_to_openpose(lm, w, h)
    assert kp[neck].tolist() == kp[KEYPOINT_NAMES.index("r_shoulder")].tolist() == [-1, -1, 0]
    with pytest.raises(ValueError, match=r"\(33, 4\)"):
        mpp.landmarks_to_openpose(lm[:, :3], w, h)


def test_missing_environment_is_named(tmp_path):
    from imagpose_jax.pose_extract import main
    nowhere = tmp_path / "no-venv"
    with pytest.raises(FileNotFoundError, match=f"no MediaPipe environment at {nowhere}.*create-mediapipe-venv"):
        mpp.MediaPipePose(nowhere)
    Image.new("RGB", (64, 64)).save(tmp_path / "me.png")
    with pytest.raises(SystemExit, match=f"error: no MediaPipe environment at {nowhere}"):
        main([str(tmp_path / "me.png"), "--out", str(tmp_path / "o"), "--mediapipe-venv", str(nowhere)])
    # an environment without mediapipe: the worker's last error line, in one line
    os.makedirs(os.path.dirname(mpp.venv_python(tmp_path / "bare")))
    os.symlink(sys.executable, mpp.venv_python(tmp_path / "bare"))
    with pytest.raises(SystemExit, match=r"^error: the MediaPipe worker .* stopped: ModuleNotFoundError: No module named "
                                         r"'mediapipe' \(a mediapipe==0\.10\.21 environment\?[^\n]*$"):
        main([str(tmp_path / "me.png"), "--out", str(tmp_path / "o"), "--mediapipe-venv", str(tmp_path / "bare")])
