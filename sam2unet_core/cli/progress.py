"""How ``sam2unet-predict`` shows the events and errors of ``predict_from_files``: JSON lines
on stdout (for the 3D Slicer module), tqdm bars on stderr, or plain lines; errors worded
with the CLI's flags."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from ..errors import OUT_OF_MEMORY

__all__ = ["FLAGS", "Progress", "flag_words", "write_json_line"]

# library option (the ``field`` of a sam2unet_core.errors error) -> the flag that sets it
FLAGS = {"axis": "--axis", "planes": "--planes", "output_format": "--format",
         "part_id": "--part-id/--num-parts", "slice_range": "--slice-range",
         "postprocess": "--postprocess", "volume_index": "--volume-index", "series_uid": "--series-uid",
         "batch_size": "--batch-size", "probabilities": "--save-probabilities", "backend": "--backend",
         "precision": "--precision", "device": "--device"}


def flag_words(message: str, kind: str | None = None, field: str | None = None, value: Any = None) -> str:
    """A library error worded with ``sam2unet-predict``'s flags, chosen by the error's
    ``field``: an out-of-memory error ends with the flag (and value) that needs less, e.g.
    ``(--batch-size 4)``, ``(without --save-probabilities)``; any other error starts with the
    flag of the option it is about, e.g. ``--slice-range: ...``. Errors without a field, or
    with one no flag sets, are left as they are."""
    flag = FLAGS.get(field or "")
    if flag is None:
        return message
    if kind != OUT_OF_MEMORY:
        return f"{flag}: {message}"
    if value is False:
        return f"{message} (without {flag})"
    return f"{message} ({flag})" if value is None or value is True else f"{message} ({flag} {value})"


_STDOUT_LOCK = threading.Lock()


def write_json_line(record: dict[str, Any]) -> None:
    """``record`` as one JSON line on stdout, written whole: the text and its newline go in
    one write, under a lock, so neither another thread nor a signal handler that raises
    (SIGTERM in the CLIs) can leave a line without its end or split one in two."""
    line = json.dumps(record) + "\n"
    with _STDOUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class Progress:
    """Turns library events into JSON lines on stdout, or tqdm bars and a line per case on
    stderr, or plain lines (``none``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.case_bar = self.slice_bar = None

    def __call__(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if "error" in event:
            event = {**event, "error": flag_words(event["error"], event.get("kind"), event.get("field"),
                                                  event.get("value"))}
        if self.mode == "jsonl":  # every event of inference.batch.EVENTS
            write_json_line(event)
            return
        if self.mode == "bar":
            self._bars(event)
        if name == "case_done":
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in event["timings"].items())
            self._say(f"{event['case']}: {event['seconds']:.2f}s ({stages}) -> {event['output']}")
        elif name == "case_error":
            self._say(f"{event['case']}: FAILED: {event['error']}")

    def _bars(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        name = event["event"]
        if name == "start":
            self.case_bar = tqdm(total=event["cases"], unit="case", file=sys.stderr, position=0)
        elif name == "case_start":
            self.slice_bar = tqdm(total=event["slices"], unit="slice", desc=event["case"],
                                  leave=False, file=sys.stderr, position=1)
        elif name == "slices" and self.slice_bar is not None:
            self.slice_bar.update(event["done"] - self.slice_bar.n)
        elif name in ("case_done", "case_error", "case_skipped"):
            if self.slice_bar is not None:
                self.slice_bar.close()
                self.slice_bar = None
            self.case_bar.update(1)
        elif name == "done":
            self.case_bar.close()

    def _say(self, line: str) -> None:
        if self.mode == "bar":
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)
