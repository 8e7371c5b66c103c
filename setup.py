"""imagpose-jax: IMAGPose (NeurIPS 2024) pose-guided person generation in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.7,<0.11",
    "flax>=0.12.1,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "safetensors>=0.4,<1",
    "pillow>=10,<14",
    "tqdm>=4.60,<5",
    "tensorboardX>=2.6,<3",  # TensorBoard scalars and sample grids from the train loop, without TensorFlow
]
# PyTorch side: reading the original's on-disk formats and serving as test references.
TORCH = [
    "torch>=2.4,<2.14",
    "diffusers>=0.30,<0.43",
    "transformers>=4.45,<6",
]
# scikit-image: the SSIM/PSNR reference. The LPIPS/FID references (torchvision, lpips, pytorch-fid) are
# deliberately absent: PyPI's torchvision is a CUDA build whose import fails next to the CPU torch, and
# then breaks `transformers` too; tests/test_metrics.py installs them into a private folder instead.
# `imagpose pose`: DWPose's two ONNX files (the original's person detector and whole-body model) on onnxruntime.
# No OpenCV: its resize/warpAffine are reproduced in NumPy (imagpose_jax/data/dwpose.py).
POSE = ["onnxruntime>=1.16,<2"]
# `imagpose aot`: jax[tpu] brings libtpu at the version pinned for the installed jax (0.10.2: libtpu 0.0.42.*), to
# compile for TPU topologies on CPU-only machines. The tests still run on the CPU (tests/conftest.py sets
# JAX_PLATFORMS=cpu); libtpu is loaded only by `jax.experimental.topologies`.
TPU_AOT = ["jax[tpu]>=0.7,<0.11; sys_platform == 'linux'"]
# onnx: torch.onnx.export of the stand-in DWPose files in tests/test_pose_extract.py. That test's reference,
# rtmlib, needs OpenCV: it installs rtmlib and opencv-python-headless into a private folder instead.
# pytest-xdist: the suite runs in two worker processes, one test file each at a time (pytest.ini).
TEST = TORCH + POSE + TPU_AOT + ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-image>=0.24,<0.27", "onnx>=1.16,<2"]
# The optional TFDS builder of DeepFashion's manual download (imagpose_jax/data/tfds_deepfashion.py). Builds and
# reads array_record files without TensorFlow; tfds 4.9 imports importlib_resources without declaring it.
TFDS = ["tensorflow-datasets>=4.9.9,<4.10", "importlib_resources>=5"]

setup(
    name="imagpose-jax",
    version="0.1.0",
    description="IMAGPose pose-guided person image generation on Stable Diffusion 1.5, in JAX/Flax",
    packages=find_packages(include=["imagpose_jax", "imagpose_jax.*", "convert_weights", "convert_weights.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"torch": TORCH, "test": TEST, "tfds": TFDS, "pose": POSE, "tpu-aot": TPU_AOT},
    entry_points={"console_scripts": [
        "imagpose=imagpose_jax.cli:main",
        "imagpose-convert=convert_weights.cli:main",
    ]},
)
