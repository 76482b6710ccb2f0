"""Turn the label map file written by ``sam2unet-predict`` into named, coloured segments.

Conventions at this boundary:
    * ``sam2unet_core.io.read_volume`` reads the file: arrays KJI, ``affine_ras`` gives RAS.
    * Slicer volumes: ``GetIJKToRASMatrix`` is RAS; ``arrayFromVolume``/``updateVolumeFromArray``
      are KJI; ``GetImageData().GetDimensions()`` is IJK.
The label array is written onto a label volume cloned from the *input* volume, so the
segmentation takes the input's exact geometry (oblique directions and parent transform
included); the file's own geometry is only checked against it, within float32 precision
of NIfTI headers.

``slicer`` and ``vtk`` are passed in (the modules in Slicer, fakes in tests).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = [
    "LabelLike",
    "readLabelFile",
    "volumeIjkToRas",
    "checkSameGrid",
    "importLabels",
]

logger = logging.getLogger(__name__)

_TEMPORARY_LABEL_NAME = "__SAM2UNetSlicer_labels__"
TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment.GetTerminologyEntryTagName()


class LabelLike(Protocol):
    """A label of ``sam2unet_core.metadata.LabelInfo``: value, name, RGB colour 0-255 (and
    the optional codes that ``sam2unet_core.terminology.label_codes`` reads)."""

    value: int
    name: str
    color: tuple[int, int, int]


def readLabelFile(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D label map with ``sam2unet_core``'s reader. Returns ``(labels_kji, ijkToRas)``:
    the array in KJI order and the file's 4x4 IJK-to-RAS matrix."""
    from sam2unet_core.io import affine_ras, read_volume  # installed with the module's dependencies

    volume = read_volume(path)
    if volume.array_kji.ndim != 3:
        raise ValueError(f"label map {path} has array shape {volume.array_kji.shape}; expected (K, J, I)")
    return volume.array_kji, affine_ras(volume)


def volumeIjkToRas(slicer: Any, vtk: Any, volumeNode: Any) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a volume node, in its own (parent transform) coordinates."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def checkSameGrid(path: Path, labelsKji: np.ndarray, labelIjkToRas: np.ndarray,
                  volumeDimensionsIjk: Sequence[int], volumeIjkToRas: np.ndarray) -> None:
    """Raise ``ValueError`` unless the label map covers exactly the input volume's voxels.

    Shapes must match (array KJI = reversed IJK dimensions). Each voxel axis may differ by
    1e-3 of its spacing, the origin by 1 % of the smallest spacing (NIfTI stores float32).
    """
    expectedShapeKji = tuple(int(d) for d in reversed(volumeDimensionsIjk))
    if tuple(labelsKji.shape) != expectedShapeKji:
        raise ValueError(
            f"label map {path} has array shape (K, J, I) = {tuple(labelsKji.shape)}, "
            f"expected {expectedShapeKji} like the input volume"
        )
    spacing = np.linalg.norm(volumeIjkToRas[:3, :3], axis=0)
    axesDiff = np.abs(labelIjkToRas[:3, :3] - volumeIjkToRas[:3, :3]).max(axis=0)
    originDiff = float(np.abs(labelIjkToRas[:3, 3] - volumeIjkToRas[:3, 3]).max())
    if np.any(axesDiff > 1e-3 * spacing) or originDiff > 1e-2 * spacing.min():
        raise ValueError(
            f"label map {path} is not on the input volume's voxel grid: its IJK-to-RAS matrix is\n"
            f"{np.array2string(labelIjkToRas, precision=4)}\nexpected\n"
            f"{np.array2string(volumeIjkToRas, precision=4)}"
        )


def importLabels(slicer: Any, vtk: Any, labelPath: Path, inputVolume: Any, segmentationNode: Any,
                 labels: Sequence[LabelLike]) -> list[str]:
    """Import label values 1..N of ``labelPath`` as segments of ``segmentationNode``, each
    tagged with its standard terminology (``sam2unet_core.terminology``).

    ``labels`` must describe the values 1..N in order (``ModelMetadata.labels``). A segment
    whose name already exists is overwritten; others are added. On failure every segment this
    call added is removed again and the error is raised. Returns the segment IDs, in label order.
    """
    from sam2unet_core.io import label_dtype
    from sam2unet_core.terminology import slicer_terminology_string

    labelsKji, labelIjkToRas = readLabelFile(labelPath)
    dimensionsIjk = inputVolume.GetImageData().GetDimensions()
    checkSameGrid(labelPath, labelsKji, labelIjkToRas, dimensionsIjk, volumeIjkToRas(slicer, vtk, inputVolume))
    values = [label.value for label in labels]
    if values != list(range(1, len(labels) + 1)):
        raise ValueError(f"labels of the model must be the values 1..N in order, got {values}")
    _logVoxelCounts(labelPath, labelsKji, labels)

    segmentation = segmentationNode.GetSegmentation()
    addedIds: list[str] = []
    segmentIds: list[str] = []
    labelNode = None
    try:
        for label in labels:
            segmentId = segmentation.GetSegmentIdBySegmentName(label.name)
            if not segmentId:
                color = tuple(channel / 255.0 for channel in label.color)
                segmentId = segmentation.AddEmptySegment("", label.name, color)
                addedIds.append(segmentId)
            segmentIds.append(segmentId)
            # Slicer shows the standard name (SNOMED CT) of a known structure from this tag.
            segmentation.GetSegment(segmentId).SetTag(TERMINOLOGY_TAG, slicer_terminology_string(label))
        idArray = vtk.vtkStringArray()
        for segmentId in segmentIds:
            idArray.InsertNextValue(segmentId)  # entry n receives label value n + 1
        # A label volume cloned from the input: same geometry and parent transform.
        labelNode = slicer.modules.volumes.logic().CreateAndAddLabelVolume(inputVolume, _TEMPORARY_LABEL_NAME)
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        dtype = label_dtype(int(labelsKji.max(initial=0)))  # never int64: Slicer refuses it
        slicer.util.updateVolumeFromArray(labelNode, labelsKji.astype(dtype, copy=False))
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode, idArray):
            raise RuntimeError(f"Slicer could not import the label map {labelPath} into {segmentationNode.GetName()}")
    except Exception:
        for segmentId in addedIds:
            segmentation.RemoveSegment(segmentId)
        raise
    finally:
        if labelNode is not None:
            slicer.mrmlScene.RemoveNode(labelNode)
    return segmentIds


def _logVoxelCounts(labelPath: Path, labelsKji: np.ndarray, labels: Sequence[LabelLike]) -> None:
    counts = np.zeros(1, dtype=np.int64)
    for sliceJi in labelsKji:  # slice by slice: no full-volume int64 copy
        sliceCounts = np.bincount(sliceJi.ravel().clip(min=0).astype(np.intp))
        size = max(len(counts), len(sliceCounts))
        counts = np.pad(counts, (0, size - len(counts))) + np.pad(sliceCounts, (0, size - len(sliceCounts)))
    for label in labels:
        count = int(counts[label.value]) if label.value < len(counts) else 0
        logger.info("%s (label %d): %d voxels", label.name, label.value, count)
    unknown = [value for value in np.flatnonzero(counts) if value > len(labels)]
    if unknown:
        logger.warning("label map %s holds values %s that the model metadata does not name; "
                       "they are not imported", labelPath, [int(v) for v in unknown])
