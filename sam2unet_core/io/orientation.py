"""View a volume as a stack of 2D slices along an anatomical plane, whatever its array order.

The direction matrix tells which index axis (i, j or k) runs closest to each patient axis
(L, P, S). :func:`plane_view` permutes and flips the ``(K, J, I)`` array, without copying,
into ``(slice, row, column)`` with the radiological display orientation of that plane:

=========  ============  =======================  ==========================
plane      slice axis    rows (top -> bottom)     columns (left -> right)
=========  ============  =======================  ==========================
axial      I -> S        anterior -> posterior    patient right -> left
coronal    P -> A        superior -> inferior     patient right -> left
sagittal   R -> L        superior -> inferior     anterior -> posterior
=========  ============  =======================  ==========================

So a model sees axial slices the same way for an RAS NIfTI, an LPS DICOM series or a
sagittally acquired MR. :meth:`PlaneView.from_plane` undoes the permutation and flips.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError

__all__ = ["PLANES", "PlaneView", "check_planes", "plane_view"]

# For each plane: (LPS axis, sign) of the slice, row and column directions (L=0, P=1, S=2).
PLANES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "axial": ((2, +1), (1, +1), (0, +1)),
    "coronal": ((1, -1), (2, -1), (0, +1)),
    "sagittal": ((0, +1), (2, -1), (1, +1)),
}


@dataclass(frozen=True)
class PlaneView:
    """How to turn a ``(K, J, I[, C])`` array into ``(slice, row, column[, C])`` and back.

    ``axes[n]`` is the array axis shown as view axis n; ``flips`` are the view axes that are
    reversed after the permutation.
    """

    plane: str
    axes: tuple[int, int, int]
    flips: tuple[int, ...]

    @property
    def slice_array_axis(self) -> int:
        """The array axis (0 = k, 1 = j, 2 = i) that the slices are taken along."""
        return self.axes[0]

    @property
    def slice_axis_flipped(self) -> bool:
        """True when view slice 0 is the LAST index along the array axis."""
        return 0 in self.flips

    def to_plane(self, array_kji: np.ndarray) -> np.ndarray:
        """``(K, J, I[, C])`` -> ``(slice, row, column[, C])``; a view, no copy."""
        extra = tuple(range(3, array_kji.ndim))
        view = array_kji.transpose(self.axes + extra)
        return np.flip(view, axis=self.flips) if self.flips else view

    def from_plane(self, array_src: np.ndarray) -> np.ndarray:
        """``(slice, row, column[, C])`` -> ``(K, J, I[, C])``; a view, no copy."""
        view = np.flip(array_src, axis=self.flips) if self.flips else array_src
        extra = tuple(range(3, array_src.ndim))
        inverse = tuple(int(a) for a in np.argsort(self.axes)) + extra
        return view.transpose(inverse)

    def slice_index(self, array_index: int, num_slices: int) -> int:
        """View slice number of an index along the slice array axis."""
        return num_slices - 1 - array_index if self.slice_axis_flipped else array_index


def plane_view(direction_lps: np.ndarray, plane: str) -> PlaneView:
    """The :class:`PlaneView` for ``plane`` (axial, coronal, sagittal) of a volume whose
    direction matrix (columns = i, j, k in LPS) is ``direction_lps``.

    Each LPS axis is matched with one index axis so that the summed alignment
    ``|cos|`` is largest (this also settles 45-degree obliques consistently).
    """
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} is not one of {sorted(PLANES)}")
    direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
    # best[lps_axis] = index axis (0=i, 1=j, 2=k) aligned with it
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(direction[axis, perm[axis]]) for axis in range(3)))
    axes, flips = [], []
    for view_axis, (lps_axis, sign) in enumerate(PLANES[plane]):
        index_axis = best[lps_axis]
        axes.append(2 - index_axis)  # index axis i/j/k -> array axis 2/1/0
        if np.sign(direction[lps_axis, index_axis]) != sign:
            flips.append(view_axis)
    return PlaneView(plane, tuple(axes), tuple(flips))  # type: ignore[arg-type]


def check_planes(planes: tuple[str, ...] | list[str]) -> None:
    """:class:`OptionError` (a ``ValueError``) unless ``planes`` are distinct names of
    :data:`PLANES` (at least one)."""
    if not planes or any(plane not in PLANES for plane in planes) or len(set(planes)) != len(planes):
        raise OptionError(f"planes {list(planes)} must be distinct planes of {sorted(PLANES)}",
                          "planes", list(planes))
