"""`config.init.model` folders are checked against the run's model settings before any weight is read: every
differing setting (UNet, pose guider or patch embedding) is named in the error."""
from __future__ import annotations

import json

import pytest

from imagpose_jax.checkpoint.params import CONFIG_FILE
from imagpose_jax.train import config as tc
from imagpose_jax.train.pretrained import load_pretrained
from train_fixtures import tiny_config


def folder_with(tmp_path, c) -> str:
    with open(tmp_path / CONFIG_FILE, "w") as f:
        json.dump(tc.model_config(c).to_dict(), f)
    return str(tmp_path)


@pytest.mark.parametrize("key, value, named", [
    ("pose_guider_channels", (16, 32, 64), "pose_guider_config.block_out_channels"),
    ("patch_size", 2, "patch_config.patch_size"),
    ("unet.cross_attention_dim", 32, "unet_config.cross_attention_dim"),
])
def test_mismatched_settings_are_named(tmp_path, key, value, named):
    run = tiny_config(3)
    run.init.model = folder_with(tmp_path, tiny_config(3))
    parent, leaf = (run.unet, key.split(".")[1]) if "." in key else (run, key)
    parent[leaf] = value
    with pytest.raises(ValueError, match=f"model settings differ.*{named}"):
        load_pretrained({}, {}, run)  # the check comes before any weight is read
