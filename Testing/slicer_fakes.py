"""A small fake of exactly the Slicer, VTK and process calls that SAM2UNetSlicerLib makes.

Each fake class has only the methods the module calls (same names and argument order as
Slicer 5.10/5.12), so a new call the fake lacks fails loudly with AttributeError. The
geometry follows Slicer: volume arrays are KJI, ``GetDimensions()`` is IJK,
``GetIJKToRASMatrix`` is RAS; the exported NRRD is LPS, written with SimpleITK.

Importing this module puts ``SAM2UNetSlicer/`` on ``sys.path`` so tests can import
``SAM2UNetSlicerLib``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[1] / "SAM2UNetSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_ids = itertools.count(1)


def obliqueIjkToRas(spacing=(0.8, 0.9, 2.5), origin=(-40.0, 25.0, 12.5), degrees=(20.0, -10.0, 35.0)) -> np.ndarray:
    """A 4x4 IJK-to-RAS matrix rotated about the three axes: an oblique volume."""
    rx, ry, rz = np.radians(degrees)
    rotX = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    rotY = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    rotZ = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotZ @ rotY @ rotX @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


# ------------------------------------------------------------------------------- VTK
class FakeMatrix4x4:
    def __init__(self) -> None:
        self.values = np.eye(4)


class FakeStringArray:
    def __init__(self) -> None:
        self.values: list[str] = []

    def InsertNextValue(self, value: str) -> int:
        self.values.append(value)
        return len(self.values) - 1


fakeVtk = SimpleNamespace(vtkMatrix4x4=FakeMatrix4x4, vtkStringArray=FakeStringArray)


# ------------------------------------------------------------------------------- MRML
class FakeImageData:
    def __init__(self, node: "FakeVolumeNode") -> None:
        self._node = node

    def GetDimensions(self) -> tuple[int, int, int]:
        k, j, i = self._node.arrayKji.shape
        return (i, j, k)  # VTK order: I, J, K


class FakeNode:
    className = "vtkMRMLNode"

    def __init__(self, scene: "FakeScene", name: str) -> None:
        self._scene = scene
        self._id = f"vtkMRMLNode{next(_ids)}"
        self._name = name
        self.transformNodeId: str | None = None

    def GetID(self) -> str:
        return self._id

    def GetName(self) -> str:
        return self._name

    def GetClassName(self) -> str:
        return self.className

    def GetTransformNodeID(self) -> str | None:
        return self.transformNodeId

    def SetAndObserveTransformNodeID(self, nodeId: str | None) -> bool:
        self.transformNodeId = nodeId
        return True


class FakeVolumeNode(FakeNode):
    """A scalar volume: ``arrayKji`` (K, J, I) voxels and a RAS ``ijkToRas`` matrix."""

    className = "vtkMRMLScalarVolumeNode"

    def __init__(self, scene: "FakeScene", name: str, arrayKji: np.ndarray, ijkToRas: np.ndarray) -> None:
        super().__init__(scene, name)
        self.arrayKji = np.asarray(arrayKji)
        self.ijkToRas = np.asarray(ijkToRas, dtype=float)

    def GetIJKToRASMatrix(self, matrix: FakeMatrix4x4) -> None:
        matrix.values = self.ijkToRas.copy()

    def GetImageData(self) -> FakeImageData:
        return FakeImageData(self)


class FakeSegment:
    def __init__(self, name: str, color: tuple[float, float, float]) -> None:
        self.name = name
        self.color = color
        self.maskKji: np.ndarray | None = None
        self.ijkToRas: np.ndarray | None = None
        self.transformNodeId: str | None = None
        self.tags: dict[str, str] = {}

    def GetName(self) -> str:
        return self.name

    def GetColor(self) -> tuple[float, float, float]:
        return self.color

    def SetTag(self, key: str, value: str) -> None:
        self.tags[key] = value


class FakeSegmentation:
    def __init__(self) -> None:
        self.segments: dict[str, FakeSegment] = {}

    def AddEmptySegment(self, segmentId: str = "", segmentName: str = "", color=None) -> str:
        segmentId = segmentId or f"Segment_{len(self.segments) + 1}"
        while segmentId in self.segments:
            segmentId += "_1"
        self.segments[segmentId] = FakeSegment(segmentName or segmentId, tuple(color) if color else (0.5, 0.5, 0.5))
        return segmentId

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        return next((sid for sid, seg in self.segments.items() if seg.name == name), "")

    def RemoveSegment(self, segmentId: str) -> None:
        del self.segments[segmentId]

    def GetSegment(self, segmentId: str) -> FakeSegment | None:
        return self.segments.get(segmentId)

    def GetNumberOfSegments(self) -> int:
        return len(self.segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self.segments)[index]


class FakeSegmentationNode(FakeNode):
    className = "vtkMRMLSegmentationNode"

    def __init__(self, scene: "FakeScene", name: str) -> None:
        super().__init__(scene, name)
        self._segmentation = FakeSegmentation()
        self.referenceVolume: FakeVolumeNode | None = None
        self.closedSurface = False

    def GetSegmentation(self) -> FakeSegmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode: FakeVolumeNode) -> None:
        self.referenceVolume = volumeNode

    def CreateClosedSurfaceRepresentation(self) -> bool:
        self.closedSurface = True
        return True


class FakeScene:
    def __init__(self) -> None:
        self.nodes: list[FakeNode] = []

    def AddNewNodeByClass(self, className: str, name: str = "") -> FakeNode:
        if className != "vtkMRMLSegmentationNode":
            raise NotImplementedError(f"the fake scene does not create {className}")
        node = FakeSegmentationNode(self, name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node: FakeNode) -> None:
        self.nodes.remove(node)

    def GetNodeByID(self, nodeId: str) -> FakeNode | None:
        return next((node for node in self.nodes if node.GetID() == nodeId), None)

    def addVolume(self, name: str, arrayKji: np.ndarray, ijkToRas: np.ndarray,
                  className: str = "vtkMRMLScalarVolumeNode") -> FakeVolumeNode:
        """Test helper (not a Slicer call): a loaded volume; ``className`` may name a subclass
        of vtkMRMLScalarVolumeNode (vtkMRMLLabelMapVolumeNode, vtkMRMLVectorVolumeNode)."""
        node = FakeVolumeNode(self, name, arrayKji, ijkToRas)
        node.className = className
        self.nodes.append(node)
        return node


# ------------------------------------------------------------------------------- logics
class FakeVolumesLogic:
    def __init__(self, scene: FakeScene) -> None:
        self._scene = scene

    def CreateAndAddLabelVolume(self, volumeNode: FakeVolumeNode, name: str) -> FakeVolumeNode:
        """Like Slicer: same geometry and parent transform as ``volumeNode``, zero voxels."""
        label = self._scene.addVolume(name, np.zeros(volumeNode.arrayKji.shape, np.uint8), volumeNode.ijkToRas,
                                      "vtkMRMLLabelMapVolumeNode")
        label.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        return label


class FakeSegmentationsLogic:
    def __init__(self) -> None:
        self.fail = False

    def ImportLabelmapToSegmentationNode(self, labelmapNode: FakeVolumeNode, segmentationNode: FakeSegmentationNode,
                                         updatedSegmentIDs: FakeStringArray) -> bool:
        """Like Slicer: entry n of ``updatedSegmentIDs`` receives the voxels of label n + 1."""
        if self.fail:
            return False
        segments = segmentationNode.GetSegmentation().segments
        for index, segmentId in enumerate(updatedSegmentIDs.values):
            segment = segments.setdefault(segmentId, FakeSegment(segmentId, (0.5, 0.5, 0.5)))
            segment.maskKji = (labelmapNode.arrayKji == index + 1).astype(np.uint8)
            segment.ijkToRas = labelmapNode.ijkToRas.copy()
            segment.transformNodeId = labelmapNode.GetTransformNodeID()
        return True


class FakeUtil:
    def __init__(self) -> None:
        self.exportFails = False

    @staticmethod
    def arrayFromVTKMatrix(vmatrix: FakeMatrix4x4) -> np.ndarray:
        return vmatrix.values.copy()

    @staticmethod
    def updateVolumeFromArray(volumeNode: FakeVolumeNode, narray: np.ndarray) -> None:
        if narray.dtype == np.int64:
            raise RuntimeError("int64 arrays are not supported by updateVolumeFromArray")  # as in Slicer
        volumeNode.arrayKji = narray.copy()

    def exportNode(self, node: FakeVolumeNode, filename: str, properties: dict = {}, world: bool = False) -> bool:  # noqa: B006 (Slicer's signature)
        """Write the volume like Slicer: voxels KJI, geometry converted from RAS to LPS."""
        if self.exportFails:
            return False
        image = sitk.GetImageFromArray(node.arrayKji)  # KJI array -> IJK image
        ijkToLps = RAS_TO_LPS @ node.ijkToRas
        spacing = np.linalg.norm(ijkToLps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((ijkToLps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(ijkToLps[:3, 3].tolist())
        sitk.WriteImage(image, filename)
        return True


def makeFakeSlicer() -> SimpleNamespace:
    scene = FakeScene()
    return SimpleNamespace(
        mrmlScene=scene,
        util=FakeUtil(),
        modules=SimpleNamespace(
            volumes=SimpleNamespace(logic=lambda logic=FakeVolumesLogic(scene): logic),
            segmentations=SimpleNamespace(logic=lambda logic=FakeSegmentationsLogic(): logic),
        ),
    )


# ------------------------------------------------------------------------------- process
class FakeRunner:
    """``ProcessRunnerProtocol`` driven by the test: ``emit`` output lines, ``finish`` it."""

    def __init__(self, failToStart: bool = False) -> None:
        self.failToStart = failToStart
        self.started: list[tuple[list[str], dict[str, str] | None]] = []
        self.cancelled = 0
        self.stopped = 0  # WarmPredictRunner.stop calls
        self._onLine: Callable[[str], None] | None = None
        self._onFinished: Callable[[int], None] | None = None
        self._pending: list[str] = []
        self._returnCode: int | None = None

    def start(self, args, env, onLine, onFinished) -> None:
        if self.failToStart:
            raise OSError(f"cannot run {args[0]}")
        self.started.append((list(args), env))
        self._onLine, self._onFinished = onLine, onFinished
        self._pending, self._returnCode = [], None

    def emit(self, *lines: str) -> None:
        self._pending.extend(lines)

    def finish(self, returnCode: int = 0) -> None:
        self._returnCode = returnCode

    def poll(self) -> bool:
        if self._onFinished is None:
            return False
        pending, self._pending = self._pending, []
        for line in pending:
            self._onLine(line)
        if self._returnCode is not None and self._onFinished is not None:
            onFinished, self._onFinished = self._onFinished, None
            onFinished(self._returnCode)
            return False
        return True

    def cancel(self) -> None:
        self.cancelled += 1
        self._onFinished = None

    # the WarmPredictRunner's own methods, for a FakeRunner standing in for the warm worker
    def stop(self) -> None:
        self.stopped += 1

    def keepOnly(self, modelPath, device) -> None:
        pass

    def isRunning(self) -> bool:
        return self._onFinished is not None

    @property
    def args(self) -> list[str]:
        return self.started[-1][0]

    def argument(self, flag: str) -> str:
        """Value after ``flag`` among the CLI's arguments (after ``python -m module``)."""
        args = self.args
        return args[args.index(flag, 3) + 1]
