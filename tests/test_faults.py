"""Nothing lost, nothing silently wrong (issue 15): whole-folder conversions (a conversion killed half-way leaves
the old folder), a damaged newest training checkpoint (resume falls back to the newest readable one), a failed
checkpoint save (one clear error, no temporary folder left), images of every PIL mode read as the right 8-bit RGB.
Each test says what the code before did."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from imagpose_jax.preprocess import BACKDROP, as_rgb_image, load_image, to_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- inference folders: whole, never a mix

def _pipeline_argv(src: str, out: str, *extra: str) -> list[str]:
    return ["pipeline", "--unet", f"{src}/denoising_unet-0.pth", "--pose-guider", f"{src}/pose_guider-0.pth",
            "--patch", f"{src}/patch-0.pth", "--vae", f"{src}/vae", "--image-encoder", f"{src}/image_encoder",
            "--config", f"{src}/config.json", "--out", out, *extra]


def _digest(folder: str) -> dict[str, str]:
    """Relative path -> sha1 of every file under `folder`."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(random tiny source checkpoints, a converted inference folder of them, its digest)."""
    from convert_weights.cli import main
    from convert_weights.random_weights import write_random_checkpoints
    root = tmp_path_factory.mktemp("faults")
    src, out = str(root / "src"), str(root / "weights")
    write_random_checkpoints(src, "tiny", seed=0, init="normal")
    assert main(_pipeline_argv(src, out)) == 0
    return src, out, _digest(out)


def _old_folder(converted, tmp_path) -> str:
    out = str(tmp_path / "weights")
    shutil.copytree(converted[1], out)
    return out


def test_out_refused_unless_overwrite_and_replaced_whole(converted, tmp_path):
    # Before: a second conversion wrote into the existing folder without a word, and a stale part (here an old
    # denoiser_ema/ of another model) survived next to the new weights.
    from convert_weights.cli import main
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)
    os.makedirs(os.path.join(out, "denoiser_ema"))
    with open(os.path.join(out, "denoiser_ema", "params.safetensors"), "wb") as f:
        f.write(b"stale")
    with pytest.raises(SystemExit, match=f"{out} exists and is not empty: pass --overwrite"):
        main(_pipeline_argv(src, out))
    assert os.path.isfile(os.path.join(out, "denoiser_ema", "params.safetensors"))
    assert main(_pipeline_argv(src, out, "--overwrite")) == 0
    assert sorted(os.listdir(out)) == ["denoiser", "image_encoder", "vae"]
    assert _digest(out) == digest
    assert sorted(os.listdir(tmp_path)) == ["weights"]  # no temporary or old folder left beside it


def test_conversion_failing_half_way_keeps_old_folder(converted, tmp_path, monkeypatch):
    # Before: the denoiser was already replaced when the VAE conversion failed: new denoiser/, old vae/ and
    # image_encoder/, a mix that loads without complaint.
    from convert_weights import cli
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)

    def fail(args):  # the VAE conversion, after the denoiser was written
        assert os.path.isfile(os.path.join(os.path.dirname(args.out), "denoiser", "params.safetensors"))
        raise RuntimeError("simulated failure after the denoiser was written")
    monkeypatch.setattr(cli, "convert_vae", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(_pipeline_argv(src, out, "--overwrite"))
    assert _digest(out) == digest
    assert sorted(os.listdir(tmp_path)) == ["weights"]


def test_conversion_killed_half_way_keeps_old_folder(converted, tmp_path):
    # Before: `imagpose-convert pipeline` wrote straight into --out: killed after the denoiser, the folder held
    # the new denoiser with the old VAE and image encoder.
    from imagpose_jax.sampling.pipeline import load_pipeline_models
    src, _, digest = converted
    out = _old_folder(converted, tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "convert_weights", *_pipeline_argv(src, out, "--overwrite")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written = f"{out}.tmp-{proc.pid}/denoiser/params.safetensors"
    deadline = time.monotonic() + 120
    while not os.path.isfile(written) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the conversion ended before the kill: {err.decode()[-2000:]}"
    assert _digest(out) == digest  # the old folder, untouched
    assert os.path.isfile(written) and not os.path.isdir(f"{out}.tmp-{proc.pid}/image_encoder")  # the half beside
    load_pipeline_models(out)


def test_atomic_folder_and_pipeline_folder_check(tmp_path):
    # Before: no such helpers (five places spelled the layout out; each writer wrote in place).
    from imagpose_jax.checkpoint.folder import PipelineFolder, atomic_folder
    target = str(tmp_path / "export")
    for round_ in range(2):  # a fresh target, then one replaced whole (a rerun's export)
        with atomic_folder(target, overwrite=True) as tmp:
            assert tmp == f"{target}.tmp-{os.getpid()}"
            os.makedirs(os.path.join(tmp, f"part{round_}"))
        assert os.listdir(target) == [f"part{round_}"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target, overwrite=True) as tmp:
            os.makedirs(os.path.join(tmp, "partial"))
            raise KeyboardInterrupt
    assert os.listdir(target) == ["part1"] and sorted(os.listdir(tmp_path)) == ["export"]
    with pytest.raises(FileNotFoundError, match=r"missing weights: .*export/denoiser .*imagpose-convert pipeline"):
        PipelineFolder(target).check()


# ---------------------------------------------------------------- training checkpoints

def _tiny_state(offset: float = 0.0):
    """A small nnx state with what a train state holds: float arrays (over orbax's 1 KiB inline limit, so they
    live in the data files), an int and a PRNG key."""
    import jax
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + offset)
            self.step = nnx.Variable(np.int32(offset))
            self.key = nnx.Variable(jax.random.key(int(offset)))
    state = nnx.state(Tiny())
    from imagpose_jax.sharding import make_mesh, state_shardings
    return state, state_shardings(state, make_mesh(devices=jax.devices()[:1]))


def _data_iterator():
    import grain
    return grain.MapDataset.range(100).to_iter_dataset().__iter__()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
@pytest.mark.parametrize("damage", ["truncate", "zero-fill"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, caplog, damage):
    # Before: the loop restored `latest_step()` (2) and failed with tensorstore's "Encountered error while reading
    # array index" carrying whole TensorStore specs: hundreds of lines, and no way on but deleting step 2 by hand.
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer, np_tree
    directory = str(tmp_path / "checkpoints")
    it = _data_iterator()
    ck = TrainCheckpointer(directory, keep=3)
    for step in (1, 2):
        next(it)
        ck.save(step, _tiny_state(step)[0], it)
    ck.close()
    data = max(glob.glob(f"{directory}/2/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    if damage == "truncate":
        os.truncate(data, os.path.getsize(data) // 3)
    else:
        with open(data, "r+b") as f:
            f.write(b"\0" * os.path.getsize(data))

    like, shardings = _tiny_state(99)
    it = _data_iterator()
    ck = TrainCheckpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING):
        step, state = ck.restore_latest(like, shardings, it)
    assert step == 1
    want = np_tree(_tiny_state(1)[0])
    got = np_tree(state)
    for key in ("kernel", "step", "key"):
        np.testing.assert_array_equal(got[key].get_value(), want[key].get_value(), err_msg=key)
    assert next(it) == 1  # the data position of step 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step 2" in warnings[0].getMessage() and "2.corrupt" in warnings[0].getMessage()
    assert len(warnings[0].getMessage()) < 1000
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt"] and ck.all_steps() == [1]
    assert ck.save(2, state, it)  # the resumed run saves step 2 again
    ck.close()
    assert TrainCheckpointer(directory).all_steps() == [1, 2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_is_one_error(tmp_path):
    # Before: orbax's own error for the newest step. Now one CheckpointError naming each step; nothing renamed
    # (e.g. a config change makes every checkpoint unreadable, and none of them is damaged).
    import jax
    from flax import nnx
    from imagpose_jax.checkpoint.train_state import CheckpointError, TrainCheckpointer
    directory = str(tmp_path / "checkpoints")
    ck = TrainCheckpointer(directory)
    ck.save(1, _tiny_state(1)[0])
    ck.close()
    other = nnx.state(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
    from imagpose_jax.sharding import make_mesh, state_shardings
    shardings = state_shardings(other, make_mesh(devices=jax.devices()[:1]))
    with pytest.raises(CheckpointError, match=f"no checkpoint in {directory} reads back: step 1: "):
        TrainCheckpointer(directory).restore_latest(other, shardings)
    assert os.listdir(directory) == ["1"]


FAILED_SAVE = textwrap.dedent("""
    import resource, signal, sys
    from test_faults import _tiny_state
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer
    state, _ = _tiny_state(1)
    ck = TrainCheckpointer(sys.argv[1], keep=3)
    ck.save(1, state)
    ck.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # files may not grow past 4 KiB: writes fail as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:  # as the training loop: saves every few steps, close() in a finally
        for step in (2, 3):
            ck.save(step, state)
    finally:
        ck.close()
""")


def test_failed_save_stops_with_one_error_and_no_temporary_folder(tmp_path):
    # Before: 420 lines on stderr (orbax logged the failure from four threads, each with a full traceback, then
    # its ValueError "OUT_OF_RANGE: Error writing ... in OCDBT database" surfaced in the next save) and
    # 2.orbax-checkpoint-tmp/ stayed on the disk.
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer
    directory = str(tmp_path / "checkpoints")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", FAILED_SAVE, directory], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "CheckpointError" in line and not line.startswith(" ")]
    assert len(errors) == 1, r.stderr[-3000:]  # (orbax's own threads may still log a line after it)
    assert errors[0].startswith("imagpose_jax.checkpoint.train_state.CheckpointError: saving checkpoint step 2 to "
                                f"{directory} failed (") and errors[0].endswith("newest complete checkpoint is step 1")
    assert "During handling" not in r.stderr and len(r.stderr.splitlines()) < 60, r.stderr[-3000:]
    assert os.listdir(directory) == ["1"]  # no *.orbax-checkpoint-tmp* left
    assert TrainCheckpointer(directory).all_steps() == [1]


# ---------------------------------------------------------------- images of every mode

def _write_png16_rgb(path: str, a: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _reads(path: str) -> list[np.ndarray]:
    """The image as each entry point reads it: load_image, as_rgb_image of an opened file, the data pipeline."""
    from imagpose_jax.data.pipeline import _open_rgb
    with Image.open(path) as im:
        opened = as_rgb_image(im)
        opened.load()
    return [np.asarray(load_image(path)), np.asarray(opened), np.asarray(_open_rgb(path))]


def _over_backdrop(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + np.array(BACKDROP) * (1 - a)


def test_16_bit_images_scaled_to_8_bits(tmp_path):
    # Before: a 16-bit grayscale PNG (mode I;16) went through PIL's convert("RGB"), which clips: 99.6% white.
    # (A 16-bit RGB PNG was already read right: PIL keeps the high bytes.)
    gray = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode == "I;16"
    want = np.repeat(np.round(gray / 257.0)[..., None], 3, -1)
    for got in _reads(str(tmp_path / "gray16.png")):
        assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, want)
    i32 = Image.fromarray(gray.astype(np.int32), "I")  # mode I (32-bit integers, as 16-bit TIFFs can open)
    np.testing.assert_array_equal(np.asarray(to_rgb(i32)), want)
    rgb = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    _write_png16_rgb(str(tmp_path / "rgb16.png"), rgb)
    for got in _reads(str(tmp_path / "rgb16.png")):
        assert np.abs(got.astype(int) - np.round(rgb / 257.0)).max() <= 1


def test_transparent_images_over_the_backdrop(tmp_path):
    # Before: convert("RGB") dropped the alpha, showing whatever colour transparent pixels held (black here,
    # a black figure outline or background the model never saw).
    rgb = np.array([[[0, 0, 0], [200, 10, 50], [30, 160, 90], [255, 255, 255]]], np.uint8)
    alpha = np.array([[0, 255, 128, 60]], np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.stack([rgb[..., 1], alpha], -1), "LA").save(tmp_path / "la.png")
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    for x in range(3):
        p.putpixel((x, 0), x)
    p.save(tmp_path / "p_transparent.png", transparency=0)
    cases = {"rgba.png": _over_backdrop(rgb, alpha),
             "la.png": _over_backdrop(np.repeat(rgb[..., 1:2], 3, -1), alpha),
             "p_transparent.png": np.array([[BACKDROP, (255, 0, 0), (0, 0, 255)]])}
    for name, want in cases.items():
        for got in _reads(str(tmp_path / name)):
            assert np.abs(got.astype(int) - want).max() <= 1, (name, got, want)
    assert BACKDROP == (240, 240, 240)


def test_palette_gray_and_cmyk_images(tmp_path):
    # Before: already right (PIL's own conversion); kept so (palette without transparency, L, 1, CMYK).
    p = Image.new("P", (2, 1))
    p.putpalette([12, 34, 56, 200, 100, 0])
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    gray = np.array([[0, 77, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1").save(tmp_path / "bw.png")
    cmyk = np.array([[[10, 20, 30, 40], [0, 0, 0, 0]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(float) / 255, cmyk[..., 3:].astype(float) / 255
    cases = {"p.png": np.array([[[12, 34, 56], [200, 100, 0]]]), "l.png": np.repeat(gray[..., None], 3, -1),
             "bw.png": np.array([[[0] * 3, [255] * 3]]), "cmyk.tif": 255 * (1 - c) * (1 - k)}
    for name, want in cases.items():
        for got in _reads(str(tmp_path / name)):
            assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1, (name, got, want)
