"""The one image type of sam2unet_core: a voxel array with its physical geometry.

Conventions (the same as SimpleITK and DICOM, so most readers need no conversion):
    * ``array_kji``: numpy array indexed ``[k, j, i]`` (slowest axis first), the order of
      ``sitk.GetArrayFromImage`` and Slicer's ``arrayFromVolume``. Colour images carry a
      trailing channel axis: ``[k, j, i, c]``.
    * ``spacing_ijk``: voxel size in mm along the i, j, k index axes (ITK order, i.e. the
      REVERSE of the array axes).
    * ``origin_lps``: physical position (mm) of voxel ``[0, 0, 0]`` in LPS (x grows to the
      patient's Left, y to Posterior, z to Superior).
    * ``direction_lps``: 3x3 matrix whose COLUMNS are the unit vectors of the i, j, k index
      axes in LPS (ITK's direction matrix).

So the physical LPS position of index ``(i, j, k)`` is
``origin_lps + direction_lps @ (spacing_ijk * (i, j, k))``. nibabel and Slicer speak RAS:
``ras = diag(-1, -1, 1) @ lps``; :func:`affine_ras` / :func:`geometry_from_affine_ras`
convert once at the file boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutOfMemoryError

__all__ = [
    "Volume",
    "LPS_TO_RAS",
    "affine_lps",
    "affine_ras",
    "geometry_from_affine_ras",
    "label_dtype",
    "available_memory",
    "check_fits_in_memory",
]

VOXEL_KINDS = "biuf"  # numpy dtype kinds a Volume may hold: bool, unsigned, signed, float

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # flips x and y; its own inverse


@dataclass
class Volume:
    """Voxel array plus geometry; see the module docstring for every convention.

    Attributes:
        array_kji: ``(K, J, I)`` or ``(K, J, I, C)`` numpy array. 2D images have K == 1.
        spacing_ijk: ``(3,)`` mm per voxel along i, j, k.
        origin_lps: ``(3,)`` mm, LPS position of voxel (0, 0, 0).
        direction_lps: ``(3, 3)``, columns = i, j, k axis directions in LPS.
        source: where the data came from (file or folder), for messages and writers.
        dicom_files: for DICOM input, the slice files in ``array_kji`` k order
            (DICOM SEG needs them as source images); empty otherwise.
        meta: free-form facts from the reader (series UID, modality, ...).
    """

    array_kji: np.ndarray
    spacing_ijk: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin_lps: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: Path | None = None
    dicom_files: tuple[Path, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing_ijk = np.asarray(self.spacing_ijk, dtype=np.float64).reshape(3)
        self.origin_lps = np.asarray(self.origin_lps, dtype=np.float64).reshape(3)
        self.direction_lps = np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)
        if self.array_kji.ndim not in (3, 4):
            raise ValueError(
                f"array_kji must be (K, J, I) or (K, J, I, C), got shape {self.array_kji.shape}"
                f" from {self.source or 'memory'}"
            )
        if self.array_kji.dtype.kind not in VOXEL_KINDS:
            raise ValueError(
                f"{self.source or 'memory'}: voxels of type {self.array_kji.dtype} are not "
                "supported; expected integer, float or boolean values"
            )
        if not np.all(np.isfinite(self.spacing_ijk)) or np.any(self.spacing_ijk <= 0):
            raise ValueError(f"spacing must be positive, got {self.spacing_ijk} in {self.source}")

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        """Spatial shape in array order ``(K, J, I)``, channels left out."""
        return tuple(int(n) for n in self.array_kji.shape[:3])  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        """1 for grey volumes, C for ``(K, J, I, C)`` arrays (RGB images: 3)."""
        return 1 if self.array_kji.ndim == 3 else int(self.array_kji.shape[3])

    @property
    def is_dicom(self) -> bool:
        return bool(self.dicom_files)

    def with_array(self, array_kji: np.ndarray, **changes: Any) -> "Volume":
        """A volume on the same grid holding ``array_kji`` (same spatial shape)."""
        if tuple(array_kji.shape[:3]) != self.shape_kji:
            raise ValueError(
                f"new array shape {array_kji.shape[:3]} differs from the grid {self.shape_kji}"
            )
        return replace(self, array_kji=array_kji, **changes)

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when ``other`` has this size, spacing, origin and direction (within atol)."""
        return (
            self.shape_kji == other.shape_kji
            and np.allclose(self.spacing_ijk, other.spacing_ijk, atol=atol)
            and np.allclose(self.origin_lps, other.origin_lps, atol=atol)
            and np.allclose(self.direction_lps, other.direction_lps, atol=atol)
        )


def affine_lps(volume: Volume) -> np.ndarray:
    """4x4 matrix mapping homogeneous index ``(i, j, k, 1)`` to LPS mm."""
    affine = np.eye(4)
    affine[:3, :3] = volume.direction_lps * volume.spacing_ijk[np.newaxis, :]
    affine[:3, 3] = volume.origin_lps
    return affine


def affine_ras(volume: Volume) -> np.ndarray:
    """4x4 matrix mapping homogeneous index ``(i, j, k, 1)`` to RAS mm (nibabel's affine)."""
    return LPS_TO_RAS @ affine_lps(volume)


def geometry_from_affine_ras(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a nibabel (IJK -> RAS) affine into ``(spacing_ijk, origin_lps, direction_lps)``.

    The columns of the 3x3 part are normalised to unit length; a sheared affine (columns not
    orthogonal) keeps its shear in ``direction_lps``, which writers then reproduce.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing == 0):
        raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
    return spacing, lps[:3, 3].copy(), linear / spacing[np.newaxis, :]


def label_dtype(max_label: int) -> np.dtype:
    """uint8 for labels up to 255, uint16 beyond (up to 65535)."""
    if max_label <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_label <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise ValueError(f"{max_label} labels do not fit in uint16")


def model_label_dtype(num_classes: int) -> np.dtype:
    """Type of a model's label maps: values 0..num_classes - 1 (0/1 for a binary model's one
    sigmoid channel): uint8, or uint16 past 255 labels."""
    return label_dtype(max(num_classes - 1, 1))


GIB = 2**30
_UNLIMITED_CGROUP = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and its parents
    (v2: ``memory.max - memory.current``; v1: ``memory.limit_in_bytes - memory.usage_in_bytes``),
    None when no limit is set or none can be read."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []  # (folder, limit file, usage file)
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, files = root, ("memory.max", "memory.current")
            if not (root / "cgroup.controllers").exists():
                base = root / "unified"
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = base / group.lstrip("/")
        while True:  # the group, then its parents up to the mount point
            candidates.append((folder, *files))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    rooms = []
    for folder, limit_file, usage_file in candidates:
        try:
            limit = (folder / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= _UNLIMITED_CGROUP:
                continue
            rooms.append(int(limit) - int((folder / usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return min(rooms) if rooms else None


def _address_space_room() -> int | None:
    """Bytes left under the soft ``RLIMIT_AS`` (``ulimit -v``): the limit minus this
    process's current virtual size (``VmSize``); None when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def available_memory() -> tuple[int, str] | None:
    """``(bytes, what limits them)``: the memory this process can still take, the smallest of
    the machine's free memory (Linux ``MemAvailable``), the room under its cgroup's memory
    limit (container, Slurm job) and the room under its address-space limit (``ulimit -v``);
    None where none of them can be read."""
    limits = [
        (_meminfo_available(), "the machine's available memory (MemAvailable)"),
        (_cgroup_room(), "the cgroup memory limit (container or job)"),
        (_address_space_room(), "the process's address-space limit (ulimit -v, RLIMIT_AS)"),
    ]
    known = [(max(room, 0), reason) for room, reason in limits if room is not None]
    return min(known, key=lambda limit: limit[0]) if known else None


def check_fits_in_memory(
    source: Path | str,
    shape: tuple[int, ...],
    itemsize: int,
    what: str = "the image (voxels plus a label map)",
    advice: str = "crop or downsample it, or run on a machine with more memory",
    field: str | None = None,
    value: Any = None,
) -> None:
    """Raise :class:`~sam2unet_core.errors.OutOfMemoryError` (a ``ValueError``) before
    allocating when arrays of ``shape`` (any axis order) with ``itemsize`` bytes a voxel, plus
    a one-byte label map of the same grid, would not fit in the memory available now
    (:func:`available_memory`, named in the message); ``advice`` says what needs less, and
    ``field``/``value`` name the option and value that do, when one does. The readers call it with header sizes only (numpy allocates
    lazily, so an oversized array would otherwise end in the kernel's out-of-memory kill
    half-way through a run instead of an error)."""
    shape = tuple(int(n) for n in shape)
    needed = int(np.prod(shape, dtype=object)) * (int(itemsize) + 1)
    available = available_memory()
    if available is not None and needed > available[0]:
        free, limited_by = available
        raise OutOfMemoryError(
            f"{source}: {what} of shape {shape} needs about {needed / GIB:.3g} GiB, "
            f"{free / GIB:.3g} GiB available (limited by {limited_by}); {advice}",
            field, value,
        )
