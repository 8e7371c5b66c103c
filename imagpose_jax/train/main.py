"""`imagpose train`: one training stage from a config file, single- or multi-host.

  imagpose train --config configs/stage1.py --workdir runs/stage1 [--config.steps=1000 --config.data.index=...]
  imagpose train --config configs/stage2.py:tiny --workdir runs/tiny2          (the tiny CPU variant)

Overrides are `--config.KEY=VALUE` (dotted keys of the config; VALUE a Python literal or a string). Running the
same command again resumes from the workdir's latest checkpoint. Multi-host: the same command on every host
(see launch/); `--distributed auto` initialises `jax.distributed` when a cluster is detected.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="imagpose train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/stageN.py, or configs/stageN.py:tiny")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, samples and the export go here")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            p.error(f"unrecognised argument {item!r} (overrides look like --config.steps=100)")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    from imagpose_jax.sharding.distributed import initialize_distributed
    initialize_distributed(args.distributed)
    from imagpose_jax.train.config import load_config
    from imagpose_jax.train.loop import train
    c = load_config(args.config, overrides)
    summary = train(c, args.workdir, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
