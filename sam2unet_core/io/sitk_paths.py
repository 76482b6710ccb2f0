"""Paths that SimpleITK can take, for any file name the operating system allows.

Linux file names are bytes. Python shows a name that is not valid UTF-8 with surrogate
escapes (``b"case\\xff.nrrd"`` -> ``"case\\udcff.nrrd"``), and SimpleITK's C++ layer aborts
the whole process on such a string (``std::logic_error``), which no ``try`` can catch. The
readers and writers therefore hand SimpleITK a stand-in path made of symbolic links in a
temporary folder:

* :func:`sitk_read_paths`: a link to the file (or, for the detached-header formats
  ``.nhdr``/``.mhd``, whose data file is named relative to the header, a link to its folder);
* :func:`sitk_write_path`: a link to the target's folder and an ASCII file name there, renamed
  to the target once SimpleITK has written it.

Paths that are valid UTF-8 are handed over unchanged, with no links made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["is_utf8", "sitk_read_paths", "sitk_write_path", "DETACHED_HEADER_SUFFIXES"]

DETACHED_HEADER_SUFFIXES = (".nhdr", ".mhd")  # headers that name a separate data file


def is_utf8(path: str | os.PathLike) -> bool:
    """True when ``path`` is valid UTF-8 (no surrogate escapes), so SimpleITK can take it."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ending(path: Path) -> str:
    """The file ending SimpleITK picks the format by (``.nrrd``, ``.mha``...), or ""."""
    return path.suffix if is_utf8(path.suffix) else ""


def _stand_in_for_reading(path: Path, folder: Path, index: int) -> str:
    """A link in ``folder`` through which SimpleITK reads ``path``."""
    target = path.resolve()
    if path.suffix.lower() in DETACHED_HEADER_SUFFIXES:
        if not is_utf8(path.name):
            raise ValueError(
                f"{path}: the file name is not valid UTF-8 and the header names its data file "
                "relative to it, so the reader cannot be given another name; rename the file "
                "to a UTF-8 name"
            )
        link = folder / f"{index}"
        os.symlink(target.parent, link, target_is_directory=True)
        return str(link / path.name)
    link = folder / f"{index}{_ending(path)}"
    os.symlink(target, link)
    return str(link)


@contextmanager
def sitk_read_paths(paths: Sequence[Path]) -> Iterator[list[str]]:
    """The ``paths`` as strings SimpleITK can open; links for those that are not UTF-8,
    removed on exit. ``ValueError`` for a detached header whose own name is not UTF-8."""
    if all(is_utf8(path) for path in paths):
        yield [str(path) for path in paths]
        return
    folder = Path(tempfile.mkdtemp(prefix="sam2unet-read-"))
    try:
        yield [str(path) if is_utf8(path) else _stand_in_for_reading(path, folder, index)
               for index, path in enumerate(paths)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def sitk_write_path(path: Path) -> Iterator[str]:
    """A string path SimpleITK can write; when ``path`` is not UTF-8, the file written under
    it is renamed to ``path`` on a clean exit (and removed on an error)."""
    if is_utf8(path):
        yield str(path)
        return
    folder = Path(tempfile.mkdtemp(prefix="sam2unet-write-"))
    link = folder / "target"
    os.symlink(path.parent.resolve(), link, target_is_directory=True)
    stand_in = f".sitk-{os.getpid()}{_ending(path)}"
    written = path.parent / stand_in
    try:
        yield str(link / stand_in)
        os.replace(written, path)
    finally:
        written.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
