"""Shared fixtures for tests and benchmarks (in the manner of gemma's `gm.testing`): random host batches of the
right shapes and ranges. Nothing here is used by training or sampling."""
from __future__ import annotations

import numpy as np

from imagpose_jax.data.batch import Batch


def random_batch(n: int, height: int, width: int, *, ref_size: tuple[int, int] | None = None,
                 known=(True, True, False, False), seed: int = 0) -> Batch:
    """A `Batch` of n grids of height x width views, random values in each field's range; `known` for every
    grid (default: the top two slots); the reference at `ref_size` (default: one view)."""
    rng = np.random.default_rng(seed)
    gh, gw = 2 * height, 2 * width
    rh, rw = ref_size or (height, width)
    return Batch(grid=rng.uniform(-1, 1, (n, gh, gw, 3)).astype(np.float32),
                 known=np.broadcast_to(np.asarray(known, bool), (n, 4)).copy(),
                 pose_grid=rng.uniform(0, 1, (n, gh, gw, 3)).astype(np.float32),
                 ref_pixels=rng.uniform(-1, 1, (n, rh, rw, 3)).astype(np.float32),
                 dino_pixels=rng.standard_normal((n, 224, 224, 3)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# The one set of tiny random-weight models: the configs' `:tiny` variants, the tests, the benchmarks and
# `convert_weights.random_weights` all build these. XLA's compile time on the CPU grows with the number of
# parameter tensors, so the UNet keeps few: two levels (32, 64 channels), one layer per block, CVA at both
# levels and in the mid block, every block type once.
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, num_attention_heads=(2, 2),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), only_cross_attention=(False, False))
TINY_PATCH_SIZE = 4          # a 64x64 view's 8x8 reference latents give 2x2 patch tokens
TINY_VIEW = 64               # the tiny models' view size (grids 128x128, latents 16x16)
# diffusers-style `AutoencoderKL` settings (SD's four blocks, narrow) and transformers-style DINOv2 ones.
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_DINO = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14, image_size=224)


def tiny_model_config(use_cva: bool = True, remat: str = "none"):
    """The tiny denoiser's `IMAGPoseConfig` (with CVA: stages 2-3; without: stage 1; `UNetConfig.remat`)."""
    from imagpose_jax.models.imagpose import IMAGPoseConfig
    from imagpose_jax.models.unet_config import UNetConfig
    return IMAGPoseConfig(unet=UNetConfig(**TINY_UNET, use_cva=use_cva, remat=remat), patch_size=TINY_PATCH_SIZE)


def drawn_modules(*ctors, seed: int = 0) -> tuple:
    """The modules `ctor(rngs)` with random weights drawn in NumPy on their abstract versions (kernels LeCun-normal,
    norm scales 1, every other parameter N(0, 0.02), so that the layers the models initialise to zero, e.g. the pose
    guider's `conv_out` and the CVA's `proj_out`, get weights too and every path reaches the output). No jitted or
    eager initialisation: XLA compiles every random draw of its own shape separately (a minute or more on a loaded
    2-core machine for the tiny models). The same modules for the same seed and constructors."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from imagpose_jax.models.init import abstract

    rng = np.random.default_rng(seed)

    def draw(path, x):
        leaf = [getattr(k, "key", None) for k in path if getattr(k, "key", None) is not None][-1]
        if leaf == "scale":
            return jnp.ones(x.shape, x.dtype)
        std = 1 / np.sqrt(np.prod(x.shape[:-1])) if leaf == "kernel" else 0.02   # kernels: LeCun normal
        return jnp.asarray((std * rng.standard_normal(x.shape)).astype(x.dtype))

    out = []
    for ctor in ctors:
        graphdef, params, rest = nnx.split(abstract(ctor), nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"{graphdef} has state other than parameters; build it with its own initialisation")
        out.append(nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, params)))
    return tuple(out)


def drawn_train_state(c, mesh=None):
    """`train.state.init_train_state` for training config `c`, the models' weights drawn by `drawn_modules` (seed
    `c.seed`) instead of initialised in one jitted program (whose every distinct-shaped random draw XLA compiles on
    its own: 40-60 s for the tiny models on a 2-core CPU) -> (graphdef, state placed by the partition rules on `mesh`
    (default: one device), shardings). The optimizer, EMA and RNG are the config's (`train.config.train_state`)."""
    import jax
    from flax import nnx
    from imagpose_jax.sharding import make_mesh
    from imagpose_jax.train import config as tc
    from imagpose_jax.train.state import abstract_train_state

    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    graphdef, _, shardings = abstract_train_state(tc.state_builder(c), mesh)
    models = [nnx.split(m) for m in drawn_modules(*tc.model_constructors(c), seed=c.seed)]

    def build(states):
        return nnx.split(tc.train_state(c, *(nnx.merge(g, s) for (g, _), s in zip(models, states))))[1]
    state = jax.jit(build, out_shardings=shardings)([s for _, s in models])
    return graphdef, state, shardings


def tiny_models(seed: int = 0, *, use_cva: bool = True, remat: str = "none"):
    """(IMAGPose, AutoencoderKL, Dinov2Model) of the tiny configs, weights drawn by `drawn_modules`."""
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
    cfg = tiny_model_config(use_cva, remat)
    return drawn_modules(lambda k: IMAGPose(cfg, rngs=k), lambda k: AutoencoderKL(VAEConfig.from_dict(TINY_VAE), rngs=k),
                         lambda k: Dinov2Model(Dinov2Config.from_dict(TINY_DINO), rngs=k), seed=seed)


def save_tiny_pipeline(folder, seed: int = 0) -> str:
    """An inference folder (`checkpoint.folder.PipelineFolder`: denoiser/, vae/, image_encoder/) of `tiny_models`,
    what `IMAGPosePipeline.from_pretrained` and `imagpose generate` / `imagpose test` load."""
    import os

    from flax import nnx
    from imagpose_jax.checkpoint.folder import PipelineFolder
    from imagpose_jax.checkpoint.params import save_params

    out = PipelineFolder(folder)
    for path, config, m in zip((out.denoiser, out.vae, out.image_encoder),
                               (tiny_model_config().to_dict(), TINY_VAE, TINY_DINO), tiny_models(seed)):
        save_params(path, dict(config), nnx.state(m, nnx.Param))
    return os.fspath(folder)
