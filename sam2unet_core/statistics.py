"""Per-case, per-label statistics of a label volume (TotalSegmentator's ``--statistics``).

For each label of the model: voxel count, volume in mL (from the voxel spacing), mean and
standard deviation of the input intensity inside the label, and the bounding box in voxel
indices ``(i, j, k)`` and its extent in mm; for a prediction fused from several planes, how
far the planes disagree on the label and where. Written as ``CASE.statistics.json`` and
``CASE.statistics.csv`` beside the case's label file. numpy only.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .io.atomic import atomic_write
from .io.volume import Volume
from .metadata import LabelInfo

if TYPE_CHECKING:
    from .inference.agreement import PlaneAgreement

__all__ = ["label_statistics", "write_statistics", "CSV_COLUMNS"]

CSV_COLUMNS = ("label", "name", "voxels", "volume_ml", "intensity_mean", "intensity_std",
               "bbox_min_ijk", "bbox_max_ijk", "bbox_size_mm", "planes_disagreement",
               "planes_disputed_slices")


def label_statistics(labels: Volume, image: Volume, label_infos: Sequence[LabelInfo],
                     agreement: PlaneAgreement | None = None) -> list[dict[str, Any]]:
    """One record per foreground label of ``label_infos`` (value > 0), in their order.

    ``labels`` and ``image`` are on the same grid (``(K, J, I)`` arrays). Bounding boxes are
    inclusive voxel indices in ``(i, j, k)`` order, None for an empty label; ``bbox_size_mm``
    is ``(max - min + 1) * spacing_ijk``; the intensity figures are None for an empty label.
    For a prediction fused from several planes (``agreement``), ``planes_disagreement`` is
    the share of the voxels some plane gives the label that not every plane gives it, and
    ``planes_disputed_slices`` the slices where the planes dispute most voxels, as
    ``"k=12"`` (array axis of the first plane's slices); both None otherwise.
    """
    if labels.shape_kji != image.shape_kji[:3]:
        raise ValueError(f"label grid {labels.shape_kji} differs from the image grid {image.shape_kji}")
    voxel_ml = float(np.prod(labels.spacing_ijk)) / 1000.0
    intensity = image.array_kji.astype(np.float64, copy=False)
    records = []
    for info in label_infos:
        if info.value == 0:
            continue
        inside = labels.array_kji == info.value
        count = int(inside.sum())
        record: dict[str, Any] = {"label": info.value, "name": info.name, "voxels": count,
                                  "volume_ml": round(count * voxel_ml, 6),
                                  "intensity_mean": None, "intensity_std": None,
                                  "bbox_min_ijk": None, "bbox_max_ijk": None, "bbox_size_mm": None,
                                  "planes_disagreement": None, "planes_disputed_slices": None}
        voted = agreement.for_label(info.value) if agreement is not None else None
        if voted is not None:
            record.update(planes_disagreement=voted.disagreement,
                          planes_disputed_slices=[f"{agreement.slice_axis}={index}"
                                                  for index, _ in voted.worst_slices])
        if count:
            values = intensity[inside]
            kji = np.nonzero(inside)
            low = [int(a.min()) for a in kji][::-1]  # (i, j, k)
            high = [int(a.max()) for a in kji][::-1]
            record.update(intensity_mean=float(values.mean()), intensity_std=float(values.std()),
                          bbox_min_ijk=low, bbox_max_ijk=high,
                          bbox_size_mm=[round(float((h - lo + 1) * s), 4)
                                        for lo, h, s in zip(low, high, labels.spacing_ijk)])
        records.append(record)
    return records


def write_statistics(records: list[dict[str, Any]], json_path: Path, csv_path: Path) -> None:
    """Write ``records`` (from :func:`label_statistics`) as JSON and CSV, atomically; lists
    in the CSV are joined with spaces."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: " ".join(str(x) for x in v) if isinstance(v, list) else ("" if v is None else v)
                         for k, v in record.items()})
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(records, indent=2)))
    atomic_write(csv_path, lambda tmp: tmp.write_text(text.getvalue()))
