"""Checkpoints: converted/exported parameter folders (`params.py`), the inference folder's layout and whole-folder
writes (`folder.py`); training state lives beside them (`train_state.py`)."""
from imagpose_jax.checkpoint.folder import PipelineFolder, atomic_folder
from imagpose_jax.checkpoint.params import load_model, load_params, save_params

__all__ = ["PipelineFolder", "atomic_folder", "load_model", "load_params", "save_params"]
