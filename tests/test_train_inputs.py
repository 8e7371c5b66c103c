"""The trainer's data location rules (`train.inputs`)."""
from __future__ import annotations

import pytest

from imagpose_jax.train.inputs import ensure_synthetic
from train_fixtures import tiny_config


def test_synthetic_data_needs_a_local_folder(tmp_path):
    c = tiny_config(2)
    with pytest.raises(ValueError, match="local file I/O, not to 'gs://bucket/run/data'"):
        ensure_synthetic(c, "gs://bucket/run")
    c.data.path = str(tmp_path / "syn")
    c.data.synthetic.num_persons, c.data.synthetic.poses_per_person = 2, 2
    index = ensure_synthetic(c, "gs://bucket/run")  # a remote workdir is fine with a local data.path
    assert index["train"].startswith(str(tmp_path)) and (tmp_path / "syn" / "train.json").is_file()
