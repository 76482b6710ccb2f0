"""How ``sam2unet-predict`` shows the events of ``predict_from_files``: JSON lines on stdout
(for the 3D Slicer module), tqdm bars on stderr, or plain lines."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["Progress", "flag_words"]

# library wording of a value that works -> the flag that gives it, in case errors
OPTION_FLAGS = {"(probabilities=False)": "(without --save-probabilities)", "batch_size=": "--batch-size ",
                "one plane (axis)": "one plane (--axis)"}


def flag_words(text: str) -> str:
    """A library message worded with ``sam2unet-predict``'s flags."""
    for words, flag in OPTION_FLAGS.items():
        text = text.replace(words, flag)
    return text


class Progress:
    """Turns library events into JSON lines on stdout, or tqdm bars and a line per case on
    stderr, or plain lines (``none``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.case_bar = self.slice_bar = None

    def __call__(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if "error" in event:
            event = {**event, "error": flag_words(event["error"])}
        if self.mode == "jsonl":  # every event of inference.batch.EVENTS
            print(json.dumps(event), flush=True)
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
