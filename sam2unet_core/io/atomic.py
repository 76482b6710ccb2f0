"""The one atomic-write helper: every output file, checkpoint and resume state goes through it.

``atomic_write(path, write)`` lets ``write`` fill a temporary file next to ``path`` (same
folder, same ending), forces it to disk (fsync), renames it over ``path`` and fsyncs the
folder, so a crash or a kill leaves either the old file or the new one, never half of one.
Temporaries that a killed process left behind are found again by :func:`remove_partials`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["PARTIAL_PREFIX", "atomic_write", "remove_partials"]

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"  # temporary files of atomic_write start with this
_PARTIAL_NAME = re.compile(re.escape(PARTIAL_PREFIX) + r"\d+-(?P<name>.+)")  # pid, then name


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the OS allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, fsync it, rename it to ``path``, fsync the folder.

    The temporary file ``.partial-<pid>-<name>`` sits next to ``path`` and ends like it
    (writers pick the format from the ending); it is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def remove_partials(paths: Iterable[Path]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` calls of any process left for
    these output paths (``.partial-<pid>-<name>``: half-written outputs of a killed run);
    returns them. Call it only for outputs that no other running process is writing."""
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(Path(path).parent, set()).add(Path(path).name)
    removed = []
    for folder, names in wanted.items():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            match = _PARTIAL_NAME.fullmatch(entry.name)
            if match and match.group("name") in names:
                entry.unlink(missing_ok=True)
                logger.info("removed %s, left by an interrupted run", entry)
                removed.append(entry)
    return removed
