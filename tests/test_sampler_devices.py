"""Data-parallel sampling over several local devices (4 fake CPU devices, in a subprocess) equals one device (this
process's)."""
import subprocess
import sys

import numpy as np
from cpu_env import cpu_env

SCRIPT = "import sys, numpy as np; from test_sampler_devices import sample; np.save(sys.argv[1], sample())"


def sample() -> np.ndarray:
    """The tiny sampler's output on 3 grids over this process's local devices."""
    import jax
    from imagpose_jax.sampling.sampler import Sampler, SamplerConfig
    from imagpose_jax.testing import random_batch, tiny_models
    model, vae, dino = tiny_models(0)
    rng = np.random.default_rng(0)
    n = 3  # not a multiple of the device count: the sampler pads
    b = random_batch(n, 64, 64, known=(True, False, True, False))
    noise = rng.standard_normal((n, 16, 16, 4)).astype(np.float32)
    s = Sampler(model, vae, dino, SamplerConfig(num_inference_steps=1))
    assert (s.mesh is not None) == (jax.local_device_count() > 1)
    return s(b, noise=noise)


def test_four_devices_equal_one(tmp_path):
    import jax
    assert jax.local_device_count() == 1
    out = tmp_path / "out4.npy"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=cpu_env(4), check=True)
    np.testing.assert_allclose(np.load(out), sample(), atol=1e-5)
