"""A warm worker for the Segment button: one child process per (model, device) that stays
alive between runs, so a second Segment pays neither the torch import nor the model load.

:class:`WarmPredictRunner` is a ``ProcessRunnerProtocol`` for the ``sam2unet-predict``
command lines of ``Parameters.buildPredictArgs``. Instead of starting that command, it sends
its arguments to ``python -m sam2unet_core.cli.worker`` (started on first use with the same
Python and environment) and delivers the worker's output lines, which are the command's own
(its JSON progress events), and its exit code, exactly as a child process of its own would.

* The worker is replaced when the model file, the device or the environment of a run differs
  (:meth:`keepOnly` stops it as soon as the panel's model or device changes), and stopped by
  :meth:`stop` (module closed) or by itself after ``idleTimeoutSeconds`` without a run.
* :meth:`cancel` kills the worker's process tree at once, as for a child process; the next
  run starts a new worker.
* A worker that dies during a run (a crash, the system's out-of-memory kill) ends that run
  with its exit code and last output; the next run starts a new one and logs what happened
  to the old one if it died between runs.

Like ``SubprocessRunner``, output is read on a thread and delivered by :meth:`poll` on the
thread that polls (Slicer's main thread).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

from .ProcessRunner import FinishedCallback, LineCallback, _killProcessTree, _newProcessGroupOptions

__all__ = ["WarmPredictRunner", "PREDICT_MODULE", "WORKER_MODULE"]

logger = logging.getLogger(__name__)

PREDICT_MODULE = "sam2unet_core.cli.predict"
WORKER_MODULE = "sam2unet_core.cli.worker"
DEFAULT_IDLE_TIMEOUT_SECONDS = 600.0


def _optionValue(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _modelStamp(path: str | None) -> tuple:
    """The model file as the worker caches it: path, size, modification time."""
    if path is None:
        return ()
    try:
        stat = Path(path).stat()
    except OSError:
        return (path,)
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


class _Worker:
    """One live worker process and the queue its reader thread fills."""

    def __init__(self, python: str, env: dict[str, str] | None, cwd: str | None, idleTimeout: float,
                 key: tuple) -> None:
        self.key = key
        self.lines: queue.Queue[str | None] = queue.Queue()
        args = [python, "-m", WORKER_MODULE, "--idle-timeout", str(idleTimeout)]
        logger.info("Starting the warm worker: %s", subprocess.list2cmdline(args))
        self.process = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **_newProcessGroupOptions())
        self.ended = False  # the reader saw the end of its output
        self.idleExit = False  # it said it stops for lack of runs (and so takes no more)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError) as err:  # pipe broken by a kill
            self.lines.put(f"[output reader stopped: {err}]")
        self.lines.put(None)

    def send(self, argv: list[str]) -> None:
        self.process.stdin.write(json.dumps({"argv": argv}) + "\n")
        self.process.stdin.flush()

    def alive(self) -> bool:
        return not self.ended and self.process.poll() is None

    def kill(self) -> None:
        _killProcessTree(self.process)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class WarmPredictRunner:
    """``ProcessRunnerProtocol`` that runs ``sam2unet-predict`` command lines in a warm worker.

    ``start(args, ...)`` takes ``[python, "-m", "sam2unet_core.cli.predict", *arguments]``.
    """

    def __init__(self, idleTimeoutSeconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS, cwd: str | None = None) -> None:
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self._cwd = cwd
        self._worker: _Worker | None = None
        self._running = False
        self._onLine: LineCallback | None = None
        self._onFinished: FinishedCallback | None = None
        self._request: tuple[str, list[str], dict[str, str] | None, tuple] | None = None  # the run's
        self.workersStarted = 0  # how many worker processes this runner started (for tests, logs)

    # ------------------------------------------------------------------ ProcessRunnerProtocol
    def start(self, args: list[str], env: dict[str, str] | None, onLine: LineCallback,
              onFinished: FinishedCallback) -> None:
        if self._running:
            raise RuntimeError("a segmentation is already running in the warm worker")
        if len(args) < 3 or args[1:3] != ["-m", PREDICT_MODULE]:
            raise ValueError(f"the warm worker runs {PREDICT_MODULE} command lines, not {args[:3]}")
        python, argv = args[0], args[3:]
        key = (python, _modelStamp(_optionValue(argv, "-m")), _optionValue(argv, "--device"),
               tuple(sorted((env or {}).items())))
        worker = self._worker
        if worker is not None and (worker.key != key or not worker.alive() or worker.idleExit):
            self._retire(worker, onLine)
        self._onLine, self._onFinished = onLine, onFinished
        self._request = (python, argv, env, key)
        self._running = True
        self._send()

    def _send(self) -> None:
        """Send the run to the worker, started first if there is none."""
        python, argv, env, key = self._request
        if self._worker is None:
            self._worker = _Worker(python, env, self._cwd, self.idleTimeoutSeconds, key)
            self.workersStarted += 1
        try:
            self._worker.send(argv)
        except OSError:  # it died in between: its output and exit code arrive through poll()
            logger.warning("the warm worker did not take the run; its exit is reported")

    def poll(self) -> bool:
        worker = self._worker
        if worker is None:
            return False
        while True:
            try:
                line = worker.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                worker.ended = True
                break
            message = _workerMessage(line)
            if message is None:
                if self._running and self._onLine is not None:
                    self._onLine(line)
                elif line.strip():
                    logger.info("warm worker: %s", line)
            elif message.get("worker") == "finished" and self._running:
                self._finish(int(message.get("returncode", 1)))
            elif message.get("worker") == "idle_exit":
                worker.idleExit = True
                logger.info("The warm worker stopped after %s s without a run", message.get("seconds"))
            if self._worker is not worker:  # a callback cancelled or stopped it
                return self._running
        if worker.ended:
            returnCode = worker.process.wait()
            self._worker = None
            if self._running and worker.idleExit:  # it timed out as the run was sent: a new one takes it
                self._send()
            elif self._running:  # it died during a run
                self._finish(returnCode)
        return self._running

    def cancel(self) -> None:
        """Stop the run at once: the worker's process tree is killed (a new one serves the
        next run); ``onFinished`` is not called."""
        if not self._running:
            return
        self._running = False
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    def isRunning(self) -> bool:
        return self._running

    # ------------------------------------------------------------------ worker life
    def stop(self) -> None:
        """Stop the worker (module closed); a run in progress is cancelled."""
        self.cancel()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    def keepOnly(self, modelPath: Path | None, device: str | None) -> None:
        """Stop an idle worker that serves another model or device than the panel's choice,
        which frees the memory (and GPU memory) its model holds."""
        worker = self._worker
        if worker is None or self._running:
            return
        python, model, workerDevice, _ = worker.key
        if model != _modelStamp(None if modelPath is None else str(modelPath)) or workerDevice != device:
            self.stop()

    def workerProcessId(self) -> int | None:
        """Process id of the live worker, None when there is none."""
        worker = self._worker
        return worker.process.pid if worker is not None and worker.alive() else None

    def _retire(self, worker: _Worker, onLine: LineCallback) -> None:
        """Stop a worker that cannot serve the next run (other model or device, or dead)."""
        if self._worker is worker:
            self._worker = None
        code = worker.process.poll()
        if code is None:
            worker.kill()
        elif code != 0:  # died between runs: say so before the new run's output
            onLine(f"The previous SAM2-UNet worker stopped unexpectedly (exit code {code}); "
                   "starting a new one.")

    def _finish(self, returnCode: int) -> None:
        self._running = False
        if self._onFinished is not None:
            self._onFinished(returnCode)


def _workerMessage(line: str) -> dict[str, Any] | None:
    """The worker's own line (``{"worker": ...}``), None for the command's output."""
    text = line.strip()
    if not text.startswith('{"worker"'):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("worker"), str) else None
