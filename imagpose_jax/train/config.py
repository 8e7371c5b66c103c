"""The objects a training config (`configs/stage{1,2,3}.py`, `configs/demo.py`; ml-collections) builds, and
`load_config`, which reads a config file with its overrides through ml-collections' own `config_flags`."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import ml_collections

from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
from imagpose_jax.models.imagpose import IMAGPose, IMAGPoseConfig
from imagpose_jax.models.init import ParamKeys
from imagpose_jax.models.unet_config import UNetConfig
from imagpose_jax.models.vae import AutoencoderKL, VAEConfig
from imagpose_jax.schedulers.common import alphas_cumprod
from imagpose_jax.sharding import batch_sharding
from imagpose_jax.train.stages import check_model_config, trainable_filter
from imagpose_jax.train.state import TrainState, make_tx
from imagpose_jax.train.step import StepConfig, TrainStep


def model_config(c: ml_collections.ConfigDict) -> IMAGPoseConfig:
    return IMAGPoseConfig(unet=UNetConfig(**c.unet.to_dict()), pose_guider_channels=tuple(c.pose_guider_channels),
                          patch_size=c.patch_size)


def training_schedule(c: ml_collections.ConfigDict):
    """The DDPM training schedule's alphas_cumprod (T,) float32."""
    return alphas_cumprod(c.noise.to_dict())


def step_config(c: ml_collections.ConfigDict) -> StepConfig:
    return StepConfig(**c.step.to_dict())


def optimizer(c: ml_collections.ConfigDict):
    """The optimizer of `c.optim`; its peak learning rate is the train step's input (`train_step`)."""
    return make_tx(**{k: v for k, v in c.optim.items() if k != "learning_rate"}, total_steps=c.steps)


def train_step(c: ml_collections.ConfigDict, graphdef, shardings=None) -> TrainStep:
    """The config's `TrainStep` for the state's graphdef, compiled for the state's `shardings` and the batch split over
    their mesh (None: wherever its inputs are), at learning rate `optim.learning_rate`."""
    placed = {}
    if shardings is not None:
        placed = dict(shardings=shardings, batch_sharding=batch_sharding(jax.tree.leaves(shardings)[0].mesh))
    return TrainStep(graphdef, step_config(c), training_schedule(c), learning_rate=c.optim.learning_rate, **placed)


def model_constructors(c: ml_collections.ConfigDict) -> tuple[Callable, Callable, Callable]:
    """The config's (denoiser, VAE, DINOv2) as constructors `ctor(rngs)`, after checking that they fit together."""
    mcfg = model_config(c)
    check_model_config(c.stage, mcfg)
    vae_cfg, dino_cfg = VAEConfig.from_dict(c.vae.to_dict()), Dinov2Config.from_dict(c.dino.to_dict())
    if vae_cfg.downscale_factor != mcfg.pose_downscale_factor:
        raise ValueError(f"the VAE downscales by {vae_cfg.downscale_factor} but the pose guider by "
                         f"{mcfg.pose_downscale_factor}: give pose_guider_channels {len(c.vae.block_out_channels)} entries")
    return (lambda rngs: IMAGPose(mcfg, rngs=rngs), lambda rngs: AutoencoderKL(vae_cfg, rngs=rngs),
            lambda rngs: Dinov2Model(dino_cfg, rngs=rngs))


def train_state(c: ml_collections.ConfigDict, model, vae, dino) -> TrainState:
    """The config's training state around these models: its optimizer over the stage's trainable parameters,
    EMA and RNG seed."""
    return TrainState(model, vae, dino, optimizer(c), trainable_filter(c.stage), seed=c.seed, ema=c.ema)


def state_builder(c: ml_collections.ConfigDict) -> Callable[[], TrainState]:
    """The `build` argument of `init_train_state`: random-weight models (pretrained weights are loaded
    into the sharded state afterwards) and an optimizer over the stage's trainable parameters."""
    ctors = model_constructors(c)

    def build() -> TrainState:
        keys = ParamKeys(c.seed)
        return train_state(c, *(ctor(keys) for ctor in ctors))
    return build


def check_run(c: ml_collections.ConfigDict) -> None:
    """The loop's counts, checked before anything is built: a ValueError naming the key."""
    counts = {"steps": c.steps, "data.batch_size": c.data.batch_size, "train.log_every": c.train.log_every,
              "train.checkpoint_every": c.train.checkpoint_every, "train.keep": c.train.keep,
              "train.max_nonfinite": c.train.max_nonfinite}
    for key, value in counts.items():
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if c.train.sample_every < 0:
        raise ValueError(f"train.sample_every must be 0 (never) or more, got {c.train.sample_every}")


def config_flag_values(argv: Sequence[str], define: Callable | None = None, *, prog: str = "imagpose"):
    """absl `FlagValues` holding `--config` (a config file, `path.py[:arg]`, with `--config.KEY=VALUE` overrides:
    ml-collections' `config_flags`), parsed from `argv` (without the program name). `define(flag_values)` may
    define more flags before parsing. absl's `flags.Error` on a bad flag, key or value."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = [prog, *argv]
    config_flags.DEFINE_config_file("config", None, "a config file: configs/stageN.py or configs/stageN.py:tiny",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    if define is not None:
        define(fv)
    fv(argv)
    return fv


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its `get_config(arg)` with `key.sub=value` overrides applied, exactly as
    `imagpose train --config spec --config.key.sub=value` reads them (ml-collections' `config_flags`: an unknown key
    or a value of the wrong type is an error)."""
    import os
    from absl import flags
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
    try:
        return config_flag_values([f"--config={spec}", *(f"--config.{o}" for o in overrides)]).config
    except flags.Error as err:
        raise ValueError(f"{spec}: {err}") from err
    except (AttributeError, KeyError) as err:
        raise KeyError(f"{spec}: an override names no config field ({err}); overrides: {list(overrides)}") from err
