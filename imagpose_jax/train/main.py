"""`imagpose train`: one training stage from a config file, single- or multi-host.

  imagpose train --config configs/stage1.py --workdir runs/stage1 [--config.steps=1000 --config.data.index=...]
  imagpose train --config configs/stage2.py:tiny --workdir runs/tiny2          (the tiny CPU variant)

The config and its `--config.KEY=VALUE` overrides are read by ml-collections' `config_flags` (an unknown key or a
value of the wrong type is an error). Running the same command again resumes from the workdir's latest checkpoint.
Multi-host: the same command on every host (see launch/); `--distributed auto` initialises `jax.distributed` when
a cluster is detected.
"""
from __future__ import annotations

import json
import logging
import sys


def _define(fv) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples and the export go here", flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed initialisation", flag_values=fv)
    flags.DEFINE_bool("progress", True, "a progress bar (--noprogress or --no-progress: none)", flag_values=fv)


def parse(argv: list[str]):
    """-> (absl FlagValues with .config, .workdir, .distributed, .progress); a bad argument exits with one line."""
    from absl import flags
    from imagpose_jax.train.config import check_run, config_flag_values
    argv = ["--noprogress" if a == "--no-progress" else a for a in argv]
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nflags: --config FILE[:tiny] --workdir DIR [--distributed auto|on|off] [--noprogress] "
              "[--config.KEY=VALUE ...]")
        raise SystemExit(0)
    try:
        fv = config_flag_values(argv, _define, prog="imagpose train")
    except (flags.Error, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"imagpose train: error: {err}") from None
    except (AttributeError, KeyError) as err:
        raise SystemExit(f"imagpose train: error: an override names no config field ({err})") from None
    if fv.config is None:
        raise SystemExit("imagpose train: error: --config is required (configs/stageN.py or configs/stageN.py:tiny)")
    if not fv.workdir:
        raise SystemExit("imagpose train: error: --workdir is required")
    try:
        check_run(fv.config)
    except ValueError as err:
        raise SystemExit(f"imagpose train: error: {err}") from None
    return fv


def main(argv=None) -> int:
    fv = parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from imagpose_jax.sharding.distributed import initialize_distributed
    initialize_distributed(fv.distributed)
    from imagpose_jax.checkpoint.finite import NonFiniteParamsError
    from imagpose_jax.data.pipeline import CorruptDataError, CorruptImageError
    from imagpose_jax.train.loop import Interrupted, NonFiniteError, train
    try:
        summary = train(fv.config, fv.workdir, progress=fv.progress)
    except Interrupted as err:
        print(f"imagpose train: {err}", file=sys.stderr)
        return 128 + err.signum
    except (NonFiniteError, NonFiniteParamsError, CorruptImageError, CorruptDataError) as err:
        print(f"imagpose train: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
