"""A quality-control thumbnail of one case: three orthogonal slices through the labels'
centre of mass, the labels overlaid in their colours, side by side in one PNG
(axial index k, coronal index j, sagittal index i of the ``(K, J, I)`` arrays). For a
prediction fused from several planes, a second row shows the three slices with the most
voxels the planes disagree on, those voxels marked in magenta: where to look first.
Needs numpy and Pillow only."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .io.atomic import atomic_write
from .io.volume import Volume
from .metadata import LabelInfo

__all__ = ["qc_image", "write_qc_png"]

OVERLAY_ALPHA = 0.5
DISPUTED_COLOUR = np.array([255.0, 0.0, 255.0])  # magenta: voxels the planes disagree on


def _grey(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((plane.astype(np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.repeat((scaled * 255.0)[..., None], 3, axis=2)


def _row(array: np.ndarray, overlays: Sequence[tuple[np.ndarray, np.ndarray]], kji: Sequence[int],
         low: float, high: float) -> np.ndarray:
    """The axial (index k), coronal (j) and sagittal (i) slices of ``array`` side by side,
    each ``(mask, colour)`` of ``overlays`` blended in."""
    k, j, i = kji
    panels = []
    for cut in ((k,), (slice(None), j), (slice(None), slice(None), i)):
        rgb = _grey(array[cut], low, high)
        for mask, colour in overlays:
            inside = mask[cut]
            rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colour
        panels.append(rgb)
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)


def qc_image(labels: Volume, image: Volume, label_infos: Sequence[LabelInfo],
             disputed: np.ndarray | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: the axial, coronal and sagittal index slices through the
    centre of mass of all labels > 0 (the volume centre when there are none), grey image
    (1st..99th percentile) with each label blended in its colour. Slices are shown as
    stored (rows along j, k, k), without resampling to the spacing.

    ``disputed``: ``(K, J, I)`` bool voxels the planes of a fused prediction disagree on
    (``PlaneAgreement.disputed``); adds a row of the slices holding most of them, those
    voxels in magenta over the labels."""
    array, lab = image.array_kji, labels.array_kji
    if array.ndim != 3 or lab.shape != array.shape:
        raise ValueError(f"QC needs a 3D image and labels on its grid, got {array.shape} and {lab.shape}")
    found = np.argwhere(lab > 0)
    centre = found.mean(0).round().astype(int) if len(found) else np.array(lab.shape) // 2
    low, high = (float(v) for v in np.percentile(array, [1, 99]))
    overlays = [(lab == info.value, np.array(info.color, dtype=np.float64))
                for info in label_infos if info.value > 0]
    rows = [_row(array, overlays, centre, low, high)]
    if disputed is not None:
        worst = [int(np.argmax(disputed.sum(axis=tuple(a for a in range(3) if a != axis))))
                 for axis in range(3)]
        rows.append(_row(array, [*overlays, (disputed, DISPUTED_COLOUR)], worst, low, high))
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 2), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(padded, axis=0)[:-2].astype(np.uint8)


def write_qc_png(labels: Volume, image: Volume, label_infos: Sequence[LabelInfo], path: Path,
                 disputed: np.ndarray | None = None) -> None:
    """Write :func:`qc_image` to ``path`` as PNG, atomically."""
    from PIL import Image

    picture = Image.fromarray(qc_image(labels, image, label_infos, disputed), mode="RGB")
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
