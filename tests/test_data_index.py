"""Dataset index readers: the IMAGPose JSON and DeepFashion CSV formats, and their errors."""
import json

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.data.index import (DataFormatError, pose_path_for, read_deepfashion,
                                     read_deepfashion_pairs, read_imagpose_json)

ROW_Y = "[34, 54, 53, 95, 132, 54, 96, 134, 137, 196, 249, 137, 196, 249, 29, 29, 32, 32]"
ROW_X = "[91, 93, 65, 59, 58, 121, 126, 128, 76, 78, 79, 111, 111, 114, 86, 97, 79, 104]"


def touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_pose_path_for():
    assert pose_path_for("/d/train/image/a_1.png") == "/d/train/dwpose/a_1.png"
    assert pose_path_for("image/image/x.jpg") == "image/dwpose/x.jpg"
    with pytest.raises(DataFormatError, match="no 'image' folder"):
        pose_path_for("/d/train/a_1.png")


def test_read_imagpose_json(tmp_path):
    for name in ("a_1.png", "a_2.png", "b_1.jpg"):
        touch_image(tmp_path / "image" / name)
        touch_image(tmp_path / "dwpose" / name)
    absolute = str(tmp_path / "image" / "b_1.jpg")
    (tmp_path / "index.json").write_text(json.dumps([["image/a_1.png", "image/a_2.png"], [absolute]]))
    persons = read_imagpose_json(tmp_path / "index.json")
    assert [p.name for p in persons] == ["a", "b"]
    assert persons[0].views[1].image == str(tmp_path / "image" / "a_2.png")
    assert persons[0].views[1].pose_image == str(tmp_path / "dwpose" / "a_2.png")
    assert persons[1].views[0].image == absolute and persons[1].views[0].keypoints is None


@pytest.mark.parametrize("content, message", [
    ("[[", "is not valid JSON"),
    (json.dumps({"a": 1}), "expected a list of persons"),
    (json.dumps([["image/a.png"], []]), "person 1 is not a non-empty list"),
    (json.dumps([["image/a.png", 3]]), "person 0 is not a non-empty list"),
    (json.dumps([["image/a.txt"]]), "person 0 lists non-image files"),
])
def test_read_imagpose_json_errors(tmp_path, content, message):
    path = tmp_path / "index.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as info:
        read_imagpose_json(path, check_files=False)
    assert str(path) in str(info.value)


def test_read_imagpose_json_missing_files(tmp_path):
    touch_image(tmp_path / "image" / "a_1.png")
    (tmp_path / "index.json").write_text(json.dumps([["image/a_1.png"]]))
    with pytest.raises(FileNotFoundError, match=r"dwpose.a_1\.png.*index\.json"):
        read_imagpose_json(tmp_path / "index.json")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_imagpose_json(tmp_path / "nothere.json")


def test_read_deepfashion(tmp_path):
    names = ["fashionWOMENBlouses_Shirtsid0000637003_1front.jpg", "fashionWOMENBlouses_Shirtsid0000637003_2side.jpg",
             "fashionMENDenimid0000008001_1front.jpg"]
    for name in names:
        touch_image(tmp_path / "img" / name)
    rows = ["name:keypoints_y:keypoints_x"] + [f"{n}:{ROW_Y}:{ROW_X}" for n in names]
    (tmp_path / "ann.csv").write_text("\n".join(rows) + "\n")
    persons = read_deepfashion(tmp_path / "ann.csv", tmp_path / "img")
    assert [p.name for p in persons] == ["fashionWOMENBlouses_Shirtsid0000637003", "fashionMENDenimid0000008001"]
    assert [len(p.views) for p in persons] == [2, 1]
    view = persons[0].views[1]
    assert view.image == str(tmp_path / "img" / names[1]) and view.pose_image is None
    np.testing.assert_array_equal(view.keypoints[0], [91, 34])


@pytest.mark.parametrize("row, message", [
    ("a_1.jpg:[1, 2]", r"line 2: expected name:keypoints_y:keypoints_x, got 2"),
    (f"a_1.jpg:[1, 2]:{ROW_X}", r"line 2 \(a_1.jpg\): keypoints_y has 2 values, expected 18"),
    (f"a_1.jpg:{ROW_Y}:[x]", r"line 2 \(a_1.jpg\): keypoints_x is not a list of integers"),
])
def test_read_deepfashion_errors(tmp_path, row, message):
    path = tmp_path / "ann.csv"
    path.write_text(f"name:keypoints_y:keypoints_x\n{row}\n")
    with pytest.raises(DataFormatError, match=message) as info:
        read_deepfashion(path, tmp_path, check_files=False)
    assert str(path) in str(info.value)


def test_read_deepfashion_missing_image(tmp_path):
    (tmp_path / "ann.csv").write_text(f"name:keypoints_y:keypoints_x\na_1.jpg:{ROW_Y}:{ROW_X}\n")
    with pytest.raises(FileNotFoundError, match=r"a_1\.jpg.*ann\.csv"):
        read_deepfashion(tmp_path / "ann.csv", tmp_path)


def test_read_deepfashion_pairs(tmp_path):
    (tmp_path / "pairs.csv").write_text("from,to\na_1.jpg,a_2.jpg\n\nb_1.jpg, b_3.jpg\n")
    assert read_deepfashion_pairs(tmp_path / "pairs.csv") == [("a_1.jpg", "a_2.jpg"), ("b_1.jpg", "b_3.jpg")]
    (tmp_path / "bad.csv").write_text("from,to\na_1.jpg\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv.* line 2: expected 'from,to'"):
        read_deepfashion_pairs(tmp_path / "bad.csv")
