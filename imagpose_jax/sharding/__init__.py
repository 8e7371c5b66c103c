"""Device mesh and partition rules for training (data parallel + FSDP, optional tensor axis)."""
from imagpose_jax.sharding.distributed import detect_multiprocess, host_batch_to_global, initialize_distributed
from imagpose_jax.sharding.mesh import BATCH_AXES, batch_sharding, make_mesh
from imagpose_jax.sharding.rules import PARTITION_RULES, spec_for, state_shardings

__all__ = ["BATCH_AXES", "PARTITION_RULES", "batch_sharding", "detect_multiprocess", "host_batch_to_global",
           "initialize_distributed", "make_mesh", "spec_for", "state_shardings"]
