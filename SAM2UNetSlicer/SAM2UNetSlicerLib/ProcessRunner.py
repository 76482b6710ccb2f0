"""Background processes that never block Slicer's GUI thread.

A runner starts a child process whose merged stdout/stderr is read line by line on a reader
thread. The owner calls ``poll()`` from the main thread (a ``qt.QTimer`` in Slicer, a loop in
tests): callbacks therefore always run on the thread that polls, which is where MRML may be
touched. ``cancel()`` kills the whole process tree (the CLI and any worker it started).

This works the same on Slicer 5.10 and 5.12+, and lets us pass the child's environment
explicitly instead of changing ``os.environ``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

__all__ = [
    "ProcessRunnerProtocol",
    "SubprocessRunner",
    "ProgressEvent",
    "parseProgressLine",
    "findPythonSlicer",
    "waitForResult",
]

logger = logging.getLogger(__name__)

LineCallback = Callable[[str], None]
FinishedCallback = Callable[[int], None]


class ProcessRunnerProtocol(Protocol):
    """What the segmentation and install logic need from a process runner."""

    def start(self, args: list[str], env: dict[str, str] | None, onLine: LineCallback,
              onFinished: FinishedCallback) -> None:
        """Start ``args``; ``onLine`` gets each output line, ``onFinished`` the return code."""

    def poll(self) -> bool:
        """Deliver pending output and completion on the calling thread; True while running."""

    def cancel(self) -> None:
        """Kill the process tree; ``onFinished`` is not called afterwards."""

    def isRunning(self) -> bool:
        """True between ``start`` and the delivery of ``onFinished`` (or ``cancel``)."""


class SubprocessRunner:
    """``ProcessRunnerProtocol`` over ``subprocess.Popen`` with a reader thread and a queue."""

    def __init__(self, cwd: str | None = None) -> None:
        self._cwd = cwd
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._onLine: LineCallback | None = None
        self._onFinished: FinishedCallback | None = None
        self._readerDone = False

    def start(self, args: list[str], env: dict[str, str] | None, onLine: LineCallback,
              onFinished: FinishedCallback) -> None:
        if self.isRunning():
            raise RuntimeError(f"a process is already running: {self._process.args}")
        self._lines = queue.Queue()
        self._readerDone = False
        self._onLine, self._onFinished = onLine, onFinished
        logger.info("Starting: %s", subprocess.list2cmdline(args))
        self._process = subprocess.Popen(
            args, env=env, cwd=self._cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
            **_newProcessGroupOptions(),
        )
        self._reader = threading.Thread(target=self._readLines, args=(self._process, self._lines), daemon=True)
        self._reader.start()

    @staticmethod
    def _readLines(process: subprocess.Popen, lines: "queue.Queue[str | None]") -> None:
        try:
            for line in process.stdout:
                lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError) as err:  # pipe broken by a kill
            lines.put(f"[output reader stopped: {err}]")
        lines.put(None)  # end of output

    def poll(self) -> bool:
        if self._process is None:
            return False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._readerDone = True
            elif self._onLine is not None:
                self._onLine(line)
            if self._process is None:  # a callback cancelled the run
                return False
        if self._readerDone and self._process.poll() is not None:
            returnCode = self._process.returncode
            self._process.stdout.close()
            self._process = None
            if self._onFinished is not None:
                self._onFinished(returnCode)
            return False
        return True

    def cancel(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        _killProcessTree(process)  # the reader thread then sees end of output and ends

    def isRunning(self) -> bool:
        return self._process is not None


def _newProcessGroupOptions() -> dict[str, Any]:
    """Start the child as the leader of a new process group so ``cancel`` reaches its children."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _killProcessTree(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started, then reap it."""
    if os.name == "nt":
        # taskkill /T walks the child tree; the PythonSlicer launcher is only its root.
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group id is the leader's pid
        except ProcessLookupError:
            pass  # already gone
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    logger.info("Process %d and its children were stopped", process.pid)


@dataclass
class ProgressEvent:
    """One JSON line of ``sam2unet-predict --progress jsonl`` (see the CLI's docs)."""

    event: str
    data: dict[str, Any]


def parseProgressLine(line: str) -> ProgressEvent | None:
    """The event of a JSON progress line, or None for any other output (logs, tqdm, warnings)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return None
    return ProgressEvent(event=data["event"], data=data)


def findPythonSlicer() -> str:
    """Absolute path of Slicer's ``PythonSlicer`` launcher (the startup PATH lacks Slicer's folders)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if candidate.is_file():
        return str(candidate)
    raise RuntimeError(
        f"PythonSlicer was not found on PATH nor next to {sys.executable}; "
        "is this module running inside 3D Slicer?"
    )


def waitForResult(results: list, poll: Callable[[], Any], cancel: Callable[[], None], what: str,
                  idle: Callable[[], None] = lambda: None, timeoutSeconds: float = 3600.0,
                  cancelAfterSeconds: float | None = None) -> Any:
    """Scripting and test helper of the logics' ``runAndWait``: call ``poll()`` and ``idle()``
    (``slicer.app.processEvents``) until the run's ``onFinished`` appended to ``results``;
    returns that result. Cancels after ``cancelAfterSeconds`` if given; raises
    ``TimeoutError`` naming ``what`` (after cancelling) past ``timeoutSeconds``."""
    startTime = time.monotonic()
    while not results:
        elapsed = time.monotonic() - startTime
        if cancelAfterSeconds is not None and elapsed > cancelAfterSeconds:
            cancel()
        elif elapsed > timeoutSeconds:
            cancel()
            raise TimeoutError(f"{what} took more than {timeoutSeconds} s")
        else:
            poll()
            idle()
            time.sleep(0.02)
    return results[0]
