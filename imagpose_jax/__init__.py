"""IMAGPose (NeurIPS 2024) in JAX/Flax NNX: pose-guided person generation on Stable Diffusion 1.5."""
__version__ = "0.1.0"
