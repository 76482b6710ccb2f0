"""How far the planes of a fused (multi-planar) prediction agree, per label.

A slice model segmenting along the axial, coronal and sagittal planes gives three label maps
of one volume. Where they differ, the fused result rests on a vote the model itself did not
agree on: the place a user should look first. For each label this module counts the voxels
that at least one plane gives that label and those that every plane gives it, and finds the
slices (of the first plane) where the planes dispute the most voxels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..io.orientation import plane_view
from ..io.volume import Volume

__all__ = ["LabelAgreement", "PlaneAgreement", "plane_agreement", "WORST_SLICES"]

WORST_SLICES = 3  # slices listed per label, most disputed first
ARRAY_AXES = "kji"  # names of the array axes 0, 1, 2


@dataclass(frozen=True)
class LabelAgreement:
    """One label's agreement between the planes.

    ``voxels_any``: voxels at least one plane gives this label; ``voxels_all``: voxels every
    plane gives it; ``disagreement``: ``1 - voxels_all / voxels_any`` (0 when no plane gives
    the label); ``worst_slices``: ``(index along the slice axis, disputed voxels)`` of the
    slices with the most disputed voxels, most first (slices without any left out).
    """

    value: int
    voxels_any: int
    voxels_all: int
    disagreement: float
    worst_slices: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class PlaneAgreement:
    """The planes' agreement of one fused prediction; ``slice_axis`` names the array axis
    (``k``, ``j`` or ``i``) of the first plane's slices, which ``worst_slices`` index.
    ``disputed``: ``(K, J, I)`` bool, the voxels the planes do not all label alike (for the
    QC picture)."""

    planes: tuple[str, ...]
    slice_axis: str
    labels: tuple[LabelAgreement, ...]
    disputed: np.ndarray = field(repr=False, compare=False)

    def for_label(self, value: int) -> LabelAgreement | None:
        return next((label for label in self.labels if label.value == value), None)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the ``disputed`` map, as plain values (JSON)."""
        return {"planes": list(self.planes), "slice_axis": self.slice_axis,
                "labels": [asdict(label) for label in self.labels]}


def plane_agreement(votes: np.ndarray, planes: Sequence[str], volume: Volume,
                    values: Sequence[int]) -> PlaneAgreement:
    """The agreement of ``votes``, the ``(P, K, J, I)`` label maps of the ``P`` ``planes`` of
    ``volume`` (same grid), for each label value of ``values``."""
    axis = plane_view(volume.direction_lps, planes[0]).slice_array_axis
    other_axes = tuple(a for a in range(3) if a != axis)
    results = []
    for value in values:
        count = np.zeros(votes.shape[1:], dtype=np.uint8)  # planes voting for `value`
        for plane_votes in votes:
            count += plane_votes == value
        voxels_any = int(np.count_nonzero(count))
        voxels_all = int(np.count_nonzero(count == len(planes)))
        disputed = ((count > 0) & (count < len(planes))).sum(axis=other_axes)
        worst = [int(index) for index in np.argsort(-disputed, kind="stable")[:WORST_SLICES]
                 if disputed[index] > 0]
        results.append(LabelAgreement(
            value=int(value), voxels_any=voxels_any, voxels_all=voxels_all,
            disagreement=round(1.0 - voxels_all / voxels_any, 6) if voxels_any else 0.0,
            worst_slices=tuple((index, int(disputed[index])) for index in worst),
        ))
    disputed = np.zeros(votes.shape[1:], dtype=bool)
    for plane_votes in votes[1:]:
        disputed |= plane_votes != votes[0]
    return PlaneAgreement(tuple(planes), ARRAY_AXES[axis], tuple(results), disputed)
