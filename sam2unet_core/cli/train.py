"""``sam2unet-train``: train SAM2-UNet from a YAML config.

Examples::

    sam2unet-train --config training/configs/polyp.yaml data.root=data/TrainDataset \\
        model.sam2_checkpoint=sam2_hiera_large.pt
    torchrun --nproc_per_node 4 -m sam2unet_core.cli.train --config X.yaml   # multi-GPU

Overrides are ``section.key=value`` (values in YAML syntax, e.g. ``optim.epochs=5``,
``augment.multiscale=[0.75,1,1.25]``). Re-running the same command continues an interrupted
run from ``<run.output>/resume.pt`` (use ``--no-resume`` to start over).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in paper defaults)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing resume.pt and start over")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings that override the config")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from sam2unet_core.train.config import load_config
    from sam2unet_core.train.trainer import train

    try:
        config = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"sam2unet-train: error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(config, resume=not args.no_resume)
    except (ValueError, FileNotFoundError) as err:
        print(f"sam2unet-train: error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        state = "stopped early" if result.stopped_early else "done"
        print(f"training {state}: {result.epochs_done} epochs, best validation Dice {result.best_dice:.4f} "
              f"(epoch {result.best_epoch}); checkpoints in {result.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
