"""One train step on 8 fake CPU devices (mesh data 2 x fsdp 4, parameters and Adam moments sharded by the
partition rules, batch over ('data', 'fsdp')) equals the single-device step: same loss and parameters."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Work in progress (issue 4): slow on 2 CPU cores, excluded from the default suite until reviewed.
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from imagpose_jax.sharding import make_mesh
    from train_fixtures import build, tiny_batch, tiny_config

    assert jax.device_count() == 8
    c = tiny_config(3)
    batch = tiny_batch(batch_size=8)
    results = []
    for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(data=2, fsdp=4)):
        graphdef, state, shardings, step = build(c, mesh)
        specs = {str(v.get_value().sharding.spec) for _, v in nnx.to_flat_state(state)}
        state, metrics = step(state, batch)
        params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state).model))}
        results.append((float(metrics["loss"]), params, specs))
    (l1, p1, _), (l8, p8, specs8) = results
    print("loss 1 device", l1, "8 devices", l8, "specs", sorted(specs8))
    assert "PartitionSpec(None, None, None, 'fsdp')" in specs8 and "PartitionSpec('fsdp', None)" in specs8
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    worst = max(float(np.abs(p8[k] - p1[k]).max()) for k in p1)
    print("max |param difference|", worst)
    assert worst < 1e-5
""")


def test_sharded_step_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-4000:]
