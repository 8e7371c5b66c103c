"""`imagpose generate` from two photos: the source's pose and the target pose are extracted (DWPose on the stand-in
ONNX files of pose_fixtures.py, whose pose model plants pose A in photo() and pose B, arms raised, in a dimmed
photo()), written to OUT/poses/, and used; the result is the pipeline's on those pose files."""
import json

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.cli import main as cli_main
from pose_fixtures import onnx_dir, photo, posed_onnx_dir  # noqa: F401 (onnx_dir, posed_onnx_dir: fixtures)

pytest.importorskip("onnxruntime", reason="the DWPose backend runs on onnxruntime")

SAMPLING = ["--view-size", "64x64", "--steps", "2"]   # test_sampler.py's program: one grid, 2 steps


def test_two_photos_one_command(posed_onnx_dir, tiny_weights, tmp_path, capsys):
    from imagpose_jax.data.dwpose import DWPose
    from imagpose_jax.pose_extract import extract_poses
    from imagpose_jax.sampling.pipeline import IMAGPosePipeline
    from imagpose_jax.sampling.sampler import SamplerConfig

    weights = tiny_weights

    me, friend = tmp_path / "me.png", tmp_path / "friend.jpg"
    Image.fromarray(photo()).save(me)
    Image.fromarray((photo() * 0.6).astype(np.uint8)).save(friend, quality=95)   # another person, another pose
    out = tmp_path / "out"
    assert cli_main(["generate", "--weights", weights, "--source", str(me), "--target-photo", str(friend),
                     "--dwpose", str(posed_onnx_dir), "--pose-cpu", "--out", str(out), *SAMPLING]) == 0
    assert "poses of 2 photo(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "poses").iterdir()) == ["friend_pose.json", "friend_pose.png", "me_pose.json",
                                                                 "me_pose.png"]
    # the poses are the backend's on each photo
    kp_me, kp_friend = extract_poses([me, friend], DWPose(posed_onnx_dir, providers=["CPUExecutionProvider"]))
    for name, kp in (("me", kp_me), ("friend", kp_friend)):
        data = json.loads((out / "poses" / f"{name}_pose.json").read_text())
        assert (data["canvas_width"], data["canvas_height"]) == (540, 720)
        np.testing.assert_array_equal(np.asarray(data["people"][0]["pose_keypoints_2d"], np.float32).reshape(18, 3), kp)
        assert (kp[:, 2] > 0.9).all() and (kp[:, :2] >= 0).all() and (kp[:, :2] < (540, 720)).all()
    wrists, shoulders = [4, 7], [2, 5]   # OpenPose order: pose A's wrists hang below the shoulders, B's are raised
    assert (kp_me[wrists, 1] > kp_me[shoulders, 1] + 100).all()
    assert (kp_friend[wrists, 1] < kp_friend[shoulders, 1] - 100).all()
    # the result is the pipeline's on the source photo with those two pose files
    pipe = IMAGPosePipeline.from_pretrained(weights, SamplerConfig(num_inference_steps=2))
    want = pipe([str(me)], [str(out / "poses" / "me_pose.json")], [str(out / "poses" / "friend_pose.json")],
                view_size=(64, 64), progress=False)
    got = np.asarray(Image.open(out / "target_000.png"), np.float32) / 255
    np.testing.assert_allclose(got, want.targets[0], atol=0.5 / 255 + 1e-6)
    assert (out / "sheet.png").is_file()


def test_photo_without_a_person_is_named(posed_onnx_dir, tiny_weights, tmp_path, capsys):
    weights = tiny_weights
    me, dark = tmp_path / "me.png", tmp_path / "night.png"
    Image.fromarray(photo()).save(me)
    Image.fromarray(photo(bright=False)).save(dark)
    argv = ["generate", "--weights", weights, "--source", str(me), "--target-photo", str(dark),
            "--dwpose", str(posed_onnx_dir), "--pose-cpu", "--out", str(tmp_path / "out"), *SAMPLING]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagpose generate: error: no person detected in ") and "night.png" in err
    with pytest.raises(SystemExit, match="--dwpose DIR"):
        cli_main(["generate", "--weights", weights, "--source", str(me), "--target-photo", str(dark),
                  "--pose-backend", "dwpose", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="give at least one --target-pose or --target-photo"):
        cli_main(["generate", "--weights", weights, "--source", str(me), "--out", str(tmp_path / "out")])
