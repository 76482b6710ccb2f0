"""The JSON lines the CLIs write for the Slicer module (``--progress jsonl``, the warm worker)
stay whole when SIGTERM's handler raises in the middle of writing one: ``print`` writes a
line's text and its newline apart, so an interrupted line ran into the next one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A handler that raises as SIGTERM's does, fired every 50 microseconds while 20,000 lines are
# written; it raises only inside the writer, so that the loop around it runs on. Written with
# print(), about 1 line in 5,000 lost its newline this way.
WRITER = """
import signal
from sam2unet_core.cli.progress import write_json_line

class Interrupted(Exception):
    pass

def interrupt(signum, frame):
    if frame is not None and frame.f_code is write_json_line.__code__:
        raise Interrupted()

signal.signal(signal.SIGALRM, interrupt)
signal.setitimer(signal.ITIMER_REAL, 5e-5, 5e-5)
interrupted = 0
for index in range(20000):
    try:
        write_json_line({"event": "slices", "case": "case%d" % index, "done": index})
    except Interrupted:
        interrupted += 1
signal.setitimer(signal.ITIMER_REAL, 0)
assert interrupted > 0, "the handler never interrupted a write"
"""


def test_lines_stay_whole_when_a_raising_signal_handler_interrupts_them() -> None:
    result = subprocess.run([sys.executable, "-c", WRITER], capture_output=True, text=True, cwd=REPO,
                            timeout=120, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) > 10000
    for line in lines:
        assert json.loads(line)["event"] == "slices", line
