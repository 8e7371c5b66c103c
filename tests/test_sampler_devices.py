"""Data-parallel sampling over several local devices (4 fake CPU devices, in a subprocess) equals one device."""
import subprocess
import sys
import textwrap

import numpy as np
from cpu_env import cpu_env

SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np, jax
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    from imagpose_jax.testing import random_batch, tiny_models
    model, vae, dino = tiny_models(0)
    rng = np.random.default_rng(0)
    n = 3  # not a multiple of the device count: the sampler pads
    b = random_batch(n, 64, 64, known=(True, False, True, False))
    noise = rng.standard_normal((n, 16, 16, 4)).astype(np.float32)
    s = Sampler(model, vae, dino, SamplerConfig(num_inference_steps=1))
    assert (s.mesh is not None) == (jax.local_device_count() > 1)
    np.save(sys.argv[1], s(b, noise=noise))
''')


def _run(tmp_path, devices: int) -> np.ndarray:
    out = tmp_path / f"out{devices}.npy"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=cpu_env(devices), check=True)
    return np.load(out)


def test_four_devices_equal_one(tmp_path):
    np.testing.assert_allclose(_run(tmp_path, 4), _run(tmp_path, 1), atol=1e-5)
