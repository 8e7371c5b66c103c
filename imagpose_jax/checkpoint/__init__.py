"""Checkpoints: converted/exported parameter folders (`params.py`); training state lives beside them."""
from imagpose_jax.checkpoint.params import load_model, load_params, save_params

__all__ = ["load_model", "load_params", "save_params"]
