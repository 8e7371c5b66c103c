"""One train step on 8 fake CPU devices (mesh data 2 x fsdp 4, parameters and Adam moments sharded by the
partition rules, batch over ('data', 'fsdp')) equals the single-device step: same loss and parameters."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from cpu_env import cpu_env



SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from imagpose_jax.sharding import batch_sharding, make_mesh, state_shardings
    from imagpose_jax.train import config as tc
    from train_fixtures import build, tiny_batch, tiny_config

    assert jax.device_count() == 8
    c = tiny_config(3)
    batch = tiny_batch(batch_size=8)
    mesh8 = make_mesh(data=2, fsdp=4)
    graphdef, state8, shardings8, step8 = build(c, mesh8)     # one (slow) init, sharded over 8 devices
    specs8 = {str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(state8)}
    mesh1 = make_mesh(devices=jax.devices()[:1])
    shardings1 = state_shardings(state8, mesh1)
    state1 = jax.device_put(jax.tree.map(lambda x: x.copy(), state8), shardings1)
    step1 = tc.train_step(c, graphdef, shardings1)
    results = []
    for step, state in ((step1, state1), (step8, state8)):
        state, metrics = step(state, batch)
        params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state).model))}
        results.append((float(metrics["loss"]), params, state))
    (l1, p1, _), (l8, p8, new8) = results

    # The 8-device state saved by orbax restores onto one device (another device count), value for value;
    # the parameters alone restore for inference.
    import tempfile
    from imagpose_jax.checkpoint.train_state import TrainCheckpointer, np_tree, restore_params
    from imagpose_jax.models.init import abstract
    from imagpose_jax.models.imagpose import IMAGPose
    ckdir = tempfile.mkdtemp()
    ck = TrainCheckpointer(ckdir, keep=2)
    ck.save(1, new8)
    ck.wait()
    back = ck.restore(1, new8, shardings1)
    ck.close()
    flat_a, flat_b = nnx.to_flat_state(np_tree(new8)), nnx.to_flat_state(np_tree(back))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
    assert {v.get_value().sharding.num_devices for _, v in nnx.to_flat_state(back)} == {1}
    abstract_params = nnx.state(abstract(lambda k: IMAGPose(tc.model_config(c), rngs=k)), nnx.Param)
    only = restore_params(ckdir, abstract_params)
    for path, v in nnx.to_flat_state(only):
        np.testing.assert_array_equal(np.asarray(v.get_value()), p8[path], err_msg=str(path))
    print("restored", len(flat_b), "leaves onto 1 device; params-only restore of", len(nnx.to_flat_state(only)))

    # A converted parameter folder loads into the sharded state slice by slice (`init.model`), strictly.
    from imagpose_jax.checkpoint import save_params
    from imagpose_jax.train.pretrained import load_pretrained
    folder = tempfile.mkdtemp()
    save_params(folder, tc.model_config(c).to_dict(), nnx.state(nnx.merge(graphdef, back).model, nnx.Param))
    c.init.model = folder
    loaded = load_pretrained(new8, shardings8, c)
    for path, v in nnx.to_flat_state(nnx.filter_state(loaded["model"], nnx.Param)):
        value = v.get_value()
        assert value.sharding == dict(nnx.to_flat_state(shardings8["model"]))[path].get_value(), path
        np.testing.assert_array_equal(np.asarray(value), p8[path], err_msg=str(path))
    c.init.model = ""
    print("loss 1 device", l1, "8 devices", l8, "specs", sorted(specs8))
    assert "P(None, None, None, 'fsdp')" in specs8 and "P('fsdp', None)" in specs8, specs8
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    worst = max(float(np.abs(p8[k] - p1[k]).max()) for k in p1)
    print("max |param difference|", worst, "over", len(p1), "tensors")
    assert worst < 1e-5
""")


def test_sharded_step_equals_single_device():
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=cpu_env(8), capture_output=True, text=True, timeout=1800)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-4000:]
