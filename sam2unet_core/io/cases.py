"""Find the cases of a batch run in an input file or folder (nnU-Net naming).

* a file -> one case;
* a folder of image files -> one case per file; nnU-Net channel suffixes are removed
  (``CASE_0000.nii.gz`` -> ``CASE``); other channels (``CASE_0001``) are not used by our
  single-channel models and are reported;
* a folder whose sub-folders hold DICOM files -> one case per sub-folder (its largest
  series unless a SeriesInstanceUID is given);
* a folder holding DICOM files itself (and no image files) -> one case, the folder.

Partial outputs (``.partial-*``), hidden files and Slicer ``.seg.nrrd`` files are ignored.

An entry that looks like an input but cannot be read (a link that points nowhere, a link
loop, a file or folder without read permission) is a case too: reading it fails with the
reason (:func:`~sam2unet_core.io.readers.unreadable_reason`), so the batch reports it as a
failed case instead of dropping it. "Looks like an input": an image ending (``.dcm`` slices
excepted), a folder, or a link that cannot be followed whose name has an image ending or no
ending at all. Other unreadable entries, and all of them in a folder that is one DICOM
series, are ignored with a warning naming them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .dicom import looks_like_dicom
from .readers import IMAGE_SUFFIXES, UNSUPPORTED_HINTS, split_suffix, unreadable_reason

__all__ = ["Case", "find_cases", "case_name", "select_part"]

logger = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One input to segment: ``name`` gives the output file name, ``path`` is read."""

    name: str
    path: Path


def case_name(path: Path) -> str:
    """Output name of an input: ``CASE_0000.nii.gz`` -> ``CASE``, ``scan.nrrd`` -> ``scan``,
    a DICOM folder -> the folder's name."""
    if path.is_dir():
        return path.name
    stem, _ = split_suffix(path)
    match = _CHANNEL.match(stem)
    return match.group("case") if match else stem


def _channel(path: Path) -> int | None:
    match = _CHANNEL.match(split_suffix(path)[0])
    return int(match.group("channel")) if match else None


def _holds_dicom(folder: Path) -> bool:
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        if any(looks_like_dicom(Path(root) / name) for name in sorted(names)):
            return True
    return False


def _first_names(paths: list[Path], count: int = 5) -> str:
    names = ", ".join(p.name for p in paths[:count])
    return names + (", ..." if len(paths) > count else "")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _unreadable_inputs(entries: list[Path]) -> list[Path]:
    """The entries that look like inputs (module docstring) and cannot be read."""
    found = []
    for path in entries:
        if unreadable_reason(path) is None:
            continue
        suffix = split_suffix(path)[1]
        followable = path.is_dir() or path.is_file()
        if (suffix in IMAGE_SUFFIXES and suffix != ".dcm") or path.is_dir() or (
            not followable and path.is_symlink() and path.suffix == ""
        ):
            found.append(path)
        else:
            logger.warning("%s: ignored, it cannot be read (%s)", path, unreadable_reason(path))
    return found


def find_cases(input_path: Path) -> list[Case]:
    """Cases of ``input_path`` sorted by name. Raises ``ValueError`` when there are none or
    when two inputs would write the same output name."""
    input_path = Path(input_path)
    if not input_path.is_dir():
        if not input_path.exists():  # a file that exists but cannot be read is a case
            raise ValueError(f"{input_path}: {unreadable_reason(input_path)}")
        return [Case(case_name(input_path), input_path)]
    reason = unreadable_reason(input_path)
    if reason is not None:
        raise ValueError(f"{input_path}: {reason}")
    entries = sorted(p for p in input_path.iterdir() if _visible(p))
    unreadable = _unreadable_inputs(entries)
    entries = [p for p in entries if p not in unreadable]
    images = [p for p in entries if p.is_file() and split_suffix(p)[1] not in ("", ".seg.nrrd", ".dcm")]
    folders = [p for p in entries if p.is_dir() and _holds_dicom(p)]
    loose_dicom = [p for p in entries if p.is_file() and looks_like_dicom(p)]
    if not images and not folders and loose_dicom:  # one series: its reader skips the rest
        for path in unreadable:
            logger.warning("%s: ignored, it cannot be read (%s)", path, unreadable_reason(path))
        return [Case(input_path.name, input_path)]
    if loose_dicom:
        logger.warning(
            "%s: ignoring %d DICOM files lying next to other cases (%s); give each series "
            "its own sub-folder, or give the file or its folder as the input",
            input_path, len(loose_dicom), _first_names(loose_dicom),
        )
    unsupported = [p for p in entries if p.is_file() and p.suffix.lower() in UNSUPPORTED_HINTS]
    if unsupported:
        logger.warning("%s: ignoring %d files of unsupported formats (%s); convert them to NIfTI",
                       input_path, len(unsupported), _first_names(unsupported))
    skipped_channels = [p.name for p in images if (_channel(p) or 0) > 0]
    if skipped_channels:
        logger.warning(
            "%s: ignoring extra channel files %s; these models read one image per case "
            "(the _0000 file)", input_path, ", ".join(skipped_channels)
        )
    cases = [Case(case_name(p), p) for p in images if (_channel(p) or 0) == 0]
    cases += [Case(p.name, p) for p in folders]
    cases += [Case(case_name(p), p) for p in unreadable if (_channel(p) or 0) == 0]
    if not cases:
        raise ValueError(
            f"{input_path}: no images found (expected .nii.gz, .nii, .nrrd, .mha, .mhd, "
            ".png, .jpg files or DICOM folders)"
        )
    by_name: dict[str, Path] = {}
    for case in cases:
        if case.name in by_name:
            raise ValueError(
                f"{input_path}: {by_name[case.name].name} and {case.path.name} would both "
                f"write the output '{case.name}'; rename one of them"
            )
        by_name[case.name] = case.path
    return sorted(cases, key=lambda c: c.name)


def select_part(cases: list[Case], num_parts: int, part_id: int) -> list[Case]:
    """Every ``num_parts``-th case starting at ``part_id`` (nnU-Net's split), so parts
    run on different GPUs or machines share nothing and cover every case once."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in [0, {num_parts}), got {part_id}")
    return cases[part_id::num_parts]
