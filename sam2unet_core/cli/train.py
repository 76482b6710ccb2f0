"""``sam2unet-train``: train SAM2-UNet from a YAML config, or from volume pairs described in a
training request (JSON, as the 3D Slicer module writes it).

Examples::

    sam2unet-train --config training/configs/polyp.yaml data.root=data/TrainDataset \\
        model.sam2_checkpoint=sam2_hiera_large.pt
    sam2unet-train --config training/configs/msd.yaml data.root=data/Task09_Spleen \\
        model.init_from=runs/liver/best.safetensors           # fine-tune one of our models
    sam2unet-train --request request.json --progress jsonl   # sam2unet_core.train.from_pairs
    torchrun --nproc_per_node 4 -m sam2unet_core.cli.train --config X.yaml   # multi-GPU

Overrides are ``section.key=value`` (values in YAML syntax, e.g. ``optim.epochs=5``,
``augment.multiscale=[0.75,1,1.25]``). Re-running the same command continues an interrupted
run from ``<run.output>/resume.pt`` (use ``--no-resume`` to start over).

``--progress jsonl`` prints one JSON event per line on stdout (``train_start``,
``train_step``, ``validation``, ``train_done``, or ``train_error``); logs go to stderr.
Exit codes: 0 done, 1 training failed, 2 bad config or request, 143 on SIGTERM (a request
run then leaves no model file and no temporary folder).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from .progress import write_json_line

__all__ = ["main"]


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that temporary folders are removed on the way out."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _events(mode: str) -> Callable[[dict[str, Any]], None] | None:
    if mode == "jsonl":
        return write_json_line
    return None


def _fail(parser_prog: str, emit: Callable[[dict[str, Any]], None] | None, message: str, code: int) -> int:
    print(f"{parser_prog}: error: {message}", file=sys.stderr)
    if emit is not None:
        emit({"event": "train_error", "error": message})
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2unet-train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None, help="YAML config (default: built-in paper defaults)")
    source.add_argument("--request", default=None, type=Path,
                        help="training request JSON: volume pairs, labels, base, budget (no config)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing resume.pt and start over")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="bar: progress bars on stderr; jsonl: JSON events on stdout (default: bar)")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings that override the config")
    args = parser.parse_args(argv)
    if args.request and (args.overrides or args.no_resume):
        parser.error("--request takes no section.key=value overrides and no --no-resume")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    emit = _events(args.progress) if rank == 0 else None
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run_request(args, emit) if args.request else _run_config(args, emit, rank)
    except _Terminated:
        print("sam2unet-train: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run_request(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None] | None) -> int:
    from sam2unet_core.train.from_pairs import TrainingRequest, train_from_pairs

    try:
        request = TrainingRequest.from_json(args.request.read_text(encoding="utf-8"))
        request.validate()
    except (OSError, ValueError) as err:
        return _fail("sam2unet-train", emit, f"{args.request}: {err}", 2)
    try:
        result = train_from_pairs(request, emit)
    except (ValueError, FileNotFoundError) as err:
        return _fail("sam2unet-train", emit, str(err), 1)
    except MemoryError as err:
        return _fail("sam2unet-train", emit, f"out of memory: {err}", 1)
    if emit is None:
        print(f"training done: {result.steps} steps, validation Dice {result.best_dice:.4f}; model {result.output}")
    return 0


def _run_config(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None] | None, rank: int) -> int:
    from sam2unet_core.train.config import load_config
    from sam2unet_core.train.callbacks import ProgressEvents
    from sam2unet_core.train.trainer import train

    try:
        config = load_config(args.config, args.overrides)
    except ValueError as err:
        return _fail("sam2unet-train", emit, str(err), 2)
    callbacks = [ProgressEvents(emit)] if emit is not None else []
    try:
        result = train(config, resume=not args.no_resume, callbacks=callbacks)
    except (ValueError, FileNotFoundError) as err:
        return _fail("sam2unet-train", emit, str(err), 1)
    if emit is not None:
        emit({"event": "train_done", "model": str((result.output / "best.safetensors").resolve()),
              "best_dice": result.best_dice, "steps": result.steps, "stopped_early": result.stopped_early})
    elif rank == 0:
        state = "stopped early" if result.stopped_early else "done"
        print(f"training {state}: {result.epochs_done} epochs, best validation Dice {result.best_dice:.4f} "
              f"(epoch {result.best_epoch}); checkpoints in {result.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
