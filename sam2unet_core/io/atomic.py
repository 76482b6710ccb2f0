"""The one atomic-write helper: every output file, checkpoint and resume state goes through it.

``atomic_write(path, write)`` lets ``write`` fill a temporary file next to ``path`` (same
folder, same ending), checks it (not empty, then the caller's ``verify``, e.g. a read-back),
forces it to disk (fsync), renames it over ``path`` and fsyncs the folder, so a crash, a kill
or a full disk leaves either the old file or the new one, never half of one.

The temporary file is ``.partial-<pid>-<host>-<name>``: ``<host>`` is a short tag of the
machine's name, so that :func:`remove_partials` deletes only the temporaries whose writer is
gone (a dead process of this machine), never those of a run still writing into the same
folder, here or on another machine sharing it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["PARTIAL_PREFIX", "atomic_write", "partial_path", "remove_partials"]

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # temporary files of atomic_write start with this
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse fsync on folders; a full disk is an error
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under: ``.partial-<pid>-<host>-<name>``."""
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{HOST_TAG}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object],
                 verify: Callable[[Path], None] | None = None) -> Path:
    """Call ``write(temporary_path)``, check the file, fsync it, rename it to ``path``,
    fsync the folder.

    The temporary file (:func:`partial_path`) sits next to ``path`` and ends like it
    (writers pick the format from the ending); it is removed if anything fails. An empty
    file is refused (``OSError``: libraries that do not check their writes leave 0 bytes on
    a full disk); ``verify(temporary_path)`` then raises ``OSError`` for a file that does not
    read back as written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        write(temporary)
        if not temporary.exists() or temporary.stat().st_size == 0:
            raise OSError(errno.EIO, f"the written file is empty (disk full?): {path}")
        if verify is not None:
            verify(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def _process_alive(pid: int) -> bool:
    """True while process ``pid`` of this machine runs (or cannot be checked)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer_gone(temporary_name: str, name: str) -> bool:
    """Whether the process that named ``temporary_name`` (a temporary of ``name``) is gone:
    ``.partial-<pid>-<host>-<name>`` of this machine, or ``.partial-<pid>-<name>`` (older
    versions, taken as this machine's)."""
    writer = temporary_name[len(PARTIAL_PREFIX):-len(name) - 1].split("-")
    if not writer[0].isdigit() or len(writer) > 2:
        return False
    if len(writer) == 2 and writer[1] != HOST_TAG:
        return False  # another machine's run: it cannot be checked from here
    return not _process_alive(int(writer[0]))


def remove_partials(paths: Iterable[Path]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` calls left for these output
    paths when their process died (half-written outputs of a killed run); returns them.

    Temporaries of a process that still runs (another run writing into the same folder)
    and of other machines are left alone.
    """
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(Path(path).parent, set()).add(Path(path).name)
    removed = []
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if not entry.name.startswith(PARTIAL_PREFIX):
                continue
            for name in names:
                if entry.name.endswith("-" + name) and _writer_gone(entry.name, name):
                    entry.unlink(missing_ok=True)
                    logger.info("removed %s, left by an interrupted run", entry)
                    removed.append(entry)
                    break
    return removed
