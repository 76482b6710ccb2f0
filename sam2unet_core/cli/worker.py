"""``python -m sam2unet_core.cli.worker``: ``sam2unet-predict`` runs, one per request, in one
process that keeps the model loaded (the 3D Slicer module's warm worker).

Each request is one JSON line on stdin, ``{"argv": [...]}``, the arguments of
``sam2unet-predict``. The run prints exactly what ``sam2unet-predict`` prints (with
``--progress jsonl``: its JSON events on stdout) and then one line
``{"worker": "finished", "returncode": N}`` with the exit code the command would have had.
The first run imports torch and loads the model; later runs with the same model file
(unchanged on disk), device, precision and backend reuse it. The worker exits with 0 when stdin
closes (its parent is gone) or after ``--idle-timeout`` seconds without a request, saying
so on stdout first (``{"worker": "idle_exit", ...}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from . import predict
from .progress import write_json_line
from ..inference.engine import Predictor

__all__ = ["FINISHED", "IDLE_EXIT", "PredictorCache", "main"]

logger = logging.getLogger(__name__)

FINISHED = "finished"  # value of "worker" in the line that ends a run
IDLE_EXIT = "idle_exit"  # value of "worker" in the line printed before an idle worker exits
# arguments that change what a run does, not the model it runs: the cached model serves them all
_RUN_ARGUMENTS = {"input", "output", "batch_size", "axis", "planes", "format", "overwrite", "num_parts",
                  "part_id", "slice_range", "series_uid", "volume_index", "list_series", "tta",
                  "postprocess", "save_probabilities", "statistics", "qc_png", "progress"}


class PredictorCache:
    """Builds the Predictor of a run as ``sam2unet-predict`` does, keeping the last model
    (its runner) for the next run with the same model file, device, precision and backend."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._predictor: Predictor | None = None

    @staticmethod
    def key(args: argparse.Namespace) -> tuple:
        """The model file (path, size, modification time) and every argument that is not
        about the run: a changed file on disk, device, precision or backend gives a new model."""
        model = Path(args.model)
        stat = model.stat()
        model_arguments = sorted((name, repr(value)) for name, value in vars(args).items()
                                 if name not in _RUN_ARGUMENTS)
        return (str(model.resolve()), stat.st_size, stat.st_mtime_ns, tuple(model_arguments))

    def __call__(self, args: argparse.Namespace) -> Predictor:
        key = self.key(args)
        if key != self._key or self._predictor is None:
            self._key, self._predictor = None, None  # the old model is released first
            self._predictor = predict._build_predictor(args)
            self._key = key
            logger.info("%s (%s) loaded for this and later runs", args.model, self._predictor.description)
        return Predictor(self._predictor.runner, batch_size=args.batch_size)


def _read_requests(stream: Any, requests: "queue.Queue[str | None]") -> None:
    for line in stream:
        requests.put(line)
    requests.put(None)  # end of input: the parent closed it or is gone


def _say(**fields: Any) -> None:
    write_json_line({"worker": fields.pop("worker"), **fields})


def _run(line: str, cache: PredictorCache) -> int:
    """One request: ``sam2unet-predict`` with its arguments; returns its exit code."""
    try:
        argv = json.loads(line)["argv"]
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv must be a list of strings")
    except (ValueError, KeyError, TypeError) as err:
        print(f"error: not a worker request ({err}): {line.strip()[:200]}", file=sys.stderr)
        return 2
    try:
        return predict.main(argv, build_predictor=cache)
    except SystemExit as stop:  # argparse's errors (exit 2) and --help
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - a failure the command does not handle: report it, keep serving
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam2unet_core.cli.worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-timeout", type=float, default=600.0,
                        help="seconds without a request after which the worker exits")
    args = parser.parse_args(argv)
    requests: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_requests, args=(sys.stdin, requests), daemon=True).start()
    cache = PredictorCache()
    while True:
        try:
            line = requests.get(timeout=args.idle_timeout)
        except queue.Empty:
            _say(worker=IDLE_EXIT, seconds=args.idle_timeout)
            return 0
        if line is None:
            return 0
        if not line.strip():
            continue
        _say(worker=FINISHED, returncode=_run(line, cache))


if __name__ == "__main__":
    raise SystemExit(main())
