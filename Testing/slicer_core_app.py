"""Slicer's own core (the ``slicer-core`` wheel: MRML scene, Colors, Volumes, Segmentations,
SubjectHierarchy logics), assembled the way Slicer's application does at start-up.

Only what slicer-core lacks because it is Qt is provided here: ``slicer.mrmlScene``,
``slicer.modules.<name>.logic()`` (the module manager) and ``slicer.util.exportNode`` (a
temporary storage node's ``WriteData``, as Slicer's own ``exportNode`` does). VTK's error and
warning output goes to a string that :meth:`SlicerCore.vtkMessages` returns; tests assert it
is empty.

Importing this module also imports ``slicer_fakes`` (for the ``SAM2UNetSlicer/`` path).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import slicer_fakes  # noqa: F401 - puts SAM2UNetSlicer/ on sys.path

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -r requirements-slicer.txt)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the importable 'slicer' is not slicer-core", allow_module_level=True)
import vtk  # noqa: E402 - the vtk that slicer-core pins

_KEEP_ALIVE: list = []  # module logics hold the application logic by a raw pointer: never free it


def exportNode(node, filename: str, properties: dict | None = None, world: bool = False) -> bool:
    """``slicer.util.exportNode`` without Qt: write ``node`` through a temporary default storage
    node; the node's own storage stays untouched. ``world=True`` (hardened) is not needed here."""
    if world:
        raise NotImplementedError("exportNode(world=True) is not provided by the slicer-core test tier")
    storageNode = node.CreateDefaultStorageNode()
    storageNode.SetFileName(str(filename))
    return bool(storageNode.WriteData(node))


class SlicerCore:
    """One application logic for the whole process and a fresh scene per :meth:`newScene`."""

    def __init__(self) -> None:
        self.output = vtk.vtkStringOutputWindow()
        vtk.vtkOutputWindow.SetInstance(self.output)
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.colors = self.appLogic.GetColorLogic()
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.subjectHierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.appLogic.SetModuleLogic("Colors", self.colors)
        for name, logic in (("Volumes", self.volumes), ("Segmentations", self.segmentations),
                            ("SubjectHierarchy", self.subjectHierarchy)):
            logic.SetMRMLApplicationLogic(self.appLogic)
            self.appLogic.SetModuleLogic(name, logic)
        _KEEP_ALIVE.append(self)
        self.scene = None

    def newScene(self):
        """A new scene with the default colour nodes, set on every logic."""
        self.scene = slicer.vtkMRMLScene()
        self.appLogic.SetMRMLScene(self.scene)
        self.colors.SetMRMLScene(self.scene)
        self.colors.AddDefaultColorNodes()
        for logic in (self.volumes, self.segmentations, self.subjectHierarchy):
            logic.SetMRMLScene(self.scene)
        return self.scene

    def modules(self) -> SimpleNamespace:
        """``slicer.modules`` as the module manager provides it: ``<name>.logic()``."""
        return SimpleNamespace(**{
            name: SimpleNamespace(logic=lambda logic=logic: logic)
            for name, logic in (("volumes", self.volumes), ("segmentations", self.segmentations),
                                ("subjecthierarchy", self.subjectHierarchy), ("colors", self.colors))
        })

    def vtkMessages(self) -> str:
        return self.output.GetOutput()

    def clearMessages(self) -> None:
        self.output = vtk.vtkStringOutputWindow()
        vtk.vtkOutputWindow.SetInstance(self.output)

    # ------------------------------------------------------------------ helpers for tests
    def nodeIds(self) -> list[str]:
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]

    def addTransform(self, matrixRas: np.ndarray, name: str = "parent"):
        transform = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrixRas))
        return transform

    def loadVolume(self, path: Path, name: str, transform=None):
        """``vtkSlicerVolumesLogic.AddArchetypeVolume``, as Slicer's Add Data does, optionally
        under a parent transform."""
        node = self.volumes.AddArchetypeVolume(str(path), name, 0)
        if node is None:
            raise RuntimeError(f"Slicer could not load {path}: {self.vtkMessages()}")
        if transform is not None:
            node.SetAndObserveTransformNodeID(transform.GetID())
        return node

    def loadSegmentedCase(self, imagePath: Path, labelPath: Path, names: list[str], name: str,
                          colors: list[tuple[float, float, float]] | None = None):
        """A training pair as a user has it: the volume of ``imagePath`` and a segmentation
        whose segment ``names[n]`` holds the voxels of label ``n + 1`` of ``labelPath`` (a label
        map on the image's grid, loaded the same way). Returns (volume, segmentation)."""
        volume = self.loadVolume(imagePath, name)
        labelVolume = self.loadVolume(labelPath, f"{name} labels")
        labelsKji = slicer.util.arrayFromVolume(labelVolume).copy()
        self.scene.RemoveNode(labelVolume)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
        segmentation.CreateDefaultDisplayNodes()  # as the Segment Editor makes it
        addSegmentsFromLabels(segmentation, labelsKji, names, volume, colors)
        return volume, segmentation


def addSegmentsFromLabels(segmentation, labelsKji: np.ndarray, names: list[str], referenceVolume,
                          colors: list[tuple[float, float, float]] | None = None) -> None:
    """Draw segment ``names[n]`` of ``segmentation`` as the voxels of label ``n + 1`` of
    ``labelsKji``, an array on the voxel grid of ``referenceVolume`` (which becomes the
    segmentation's reference geometry); ``colors`` in 0..1, or a distinct default each."""
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
    for value, segmentName in enumerate(names, start=1):
        color = colors[value - 1] if colors else (0.2 * value, 0.6, 1.0 - 0.2 * value)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", segmentName, color)
        slicer.util.updateSegmentBinaryLabelmapFromArray((labelsKji == value).astype(np.uint8), segmentation,
                                                         segmentId, referenceVolume)


_CORE: SlicerCore | None = None


@contextlib.contextmanager
def installedCore(monkeypatch: pytest.MonkeyPatch):
    """A :class:`SlicerCore` with a fresh scene, installed as ``slicer.mrmlScene``,
    ``slicer.modules`` and ``slicer.util.exportNode`` until the block ends; fails on any VTK
    error output."""
    global _CORE
    if _CORE is None:
        _CORE = SlicerCore()
    core = _CORE
    core.clearMessages()
    scene = core.newScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", core.modules(), raising=False)
    monkeypatch.setattr(slicer.util, "exportNode", exportNode)
    yield core
    messages = core.vtkMessages()
    core.clearMessages()
    scene.Clear(1)
    assert messages == "", f"VTK printed errors or warnings:\n{messages}"


@pytest.fixture
def slicerCore(monkeypatch: pytest.MonkeyPatch):
    """:func:`installedCore` for one test."""
    with installedCore(monkeypatch) as core:
        yield core
