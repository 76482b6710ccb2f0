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
    def __init__(self, scene: "FakeScene", name: str) -> None:
        self._scene = scene
        self._id = f"vtkMRMLNode{next(_ids)}"
        self._name = name
        self.transformNodeId: str | None = None

    def GetID(self) -> str:
        return self._id

    def GetName(self) -> str:
        return self._name

    def GetTransformNodeID(self) -> str | None:
        return self.transformNodeId

    def SetAndObserveTransformNodeID(self, nodeId: str | None) -> bool:
        self.transformNodeId = nodeId
        return True


class FakeVolumeNode(FakeNode):
    """A scalar volume: ``arrayKji`` (K, J, I) voxels and a RAS ``ijkToRas`` matrix."""

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


class FakeSegmentationNode(FakeNode):
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

    def addVolume(self, name: str, arrayKji: np.ndarray, ijkToRas: np.ndarray) -> FakeVolumeNode:
        """Test helper (not a Slicer call): a loaded volume."""
        node = FakeVolumeNode(self, name, arrayKji, ijkToRas)
        self.nodes.append(node)
        return node


# ------------------------------------------------------------------------------- logics
class FakeVolumesLogic:
    def __init__(self, scene: FakeScene) -> None:
        self._scene = scene

    def CreateAndAddLabelVolume(self, volumeNode: FakeVolumeNode, name: str) -> FakeVolumeNode:
        """Like Slicer: same geometry and parent transform as ``volumeNode``, zero voxels."""
        label = self._scene.addVolume(name, np.zeros(volumeNode.arrayKji.shape, np.uint8), volumeNode.ijkToRas)
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

    def isRunning(self) -> bool:
        return self._onFinished is not None

    @property
    def args(self) -> list[str]:
        return self.started[-1][0]

    def argument(self, flag: str) -> str:
        """Value after ``flag`` among the CLI's arguments (after ``python -m module``)."""
        args = self.args
        return args[args.index(flag, 3) + 1]


# ------------------------------------------------------------------------------- module fakes
# What SAM2UNetSlicer.py itself imports: the slicer/qt/vtk modules, parameterNodeWrapper,
# ScriptedLoadableModule base classes and widgets named as in the .ui file.
class FakeWidget:
    """Any widget of the .ui file: properties are plain attributes, signals are recorded."""

    def __init__(self, name: str, widgetClass: str) -> None:
        self.name, self.widgetClass = name, widgetClass
        self.enabled, self.toolTip, self.text, self.format = True, "", "", ""
        self.minimum, self.maximum, self.value = 0, 100, 0
        self.lines: list[str] = []
        self.slots: dict[str, Callable] = {}
        self.historyAdds = 0

    def connect(self, signal: str, slot: Callable) -> None:
        self.slots[signal] = slot

    def emit(self, signal: str, *args) -> None:
        """Test helper: the user triggers ``signal``. Like PythonQt, a slot that takes fewer
        arguments than the signal carries gets only the first ones."""
        import inspect

        slot = self.slots[signal]
        parameters = inspect.signature(slot).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters):
            args = args[:len(parameters)]
        slot(*args)

    def setRange(self, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum

    def setValue(self, value: int) -> None:
        self.value = value

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def clear(self) -> None:
        self.lines = []

    def toPlainText(self) -> str:
        return "\n".join(self.lines)

    def addCurrentPathToHistory(self) -> None:
        self.historyAdds += 1

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


def uiWidgetsFromFile(path: Path) -> dict[str, FakeWidget]:
    import xml.etree.ElementTree as ET

    return {w.get("name"): FakeWidget(w.get("name"), w.get("class")) for w in ET.parse(path).getroot().iter("widget")}


class FakeParameterNode:
    """The raw scripted module node: values and observers of the wrapper live here."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.observers: list[Callable] = []
        self.guiConnections = 0


def fakeParameterNodeWrapper(cls):
    import enum
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {}
    for name, hint in hints.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if name in cls.__dict__:
            defaults[name] = cls.__dict__[name]
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            defaults[name] = next(iter(base))  # Slicer: the first member
        elif base is Path:
            defaults[name] = Path()  # Slicer: reads back as "."
        else:
            defaults[name] = None  # nodes

    class Wrapper:
        fields = tuple(hints)

        def __init__(self, raw: FakeParameterNode) -> None:
            object.__setattr__(self, "_raw", raw)
            for name, value in defaults.items():
                raw.values.setdefault(name, value)

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(name)
            value = self._raw.values[name]
            if isinstance(value, FakeNode) and value not in value._scene.nodes:
                return None  # Slicer drops references to removed nodes
            return value

        def __setattr__(self, name, value) -> None:
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name}")
            self._raw.values[name] = value
            for observer in list(self._raw.observers):
                observer(self, "ModifiedEvent")

        @property
        def fakeObservers(self) -> list[Callable]:
            return self._raw.observers

        def connectGui(self, ui) -> str:
            self._raw.guiConnections += 1
            return "gui-tag"

        def disconnectGui(self, tag: str) -> None:
            self._raw.guiConnections -= 1

    Wrapper.__name__ = cls.__name__
    return Wrapper


class FakeObservationMixin:
    def addObserver(self, obj, event, method) -> None:
        if hasattr(obj, "fakeObservers"):
            obj.fakeObservers.append(method)

    def removeObserver(self, obj, event, method) -> None:
        if hasattr(obj, "fakeObservers") and method in obj.fakeObservers:
            obj.fakeObservers.remove(method)

    def removeObservers(self) -> None:
        pass


class FakeTimer:
    def __init__(self) -> None:
        self.active = False
        self.slots: dict[str, Callable] = {}

    def setInterval(self, milliseconds: int) -> None:
        self.interval = milliseconds

    def connect(self, signal: str, slot: Callable) -> None:
        self.slots[signal] = slot

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class FakeSettings:
    store: dict[str, str] = {}

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.store[key] = value


def installFakeSlicerModules(monkeypatch, confirm: bool = True) -> SimpleNamespace:
    """Put fake ``slicer``, ``qt``, ``vtk`` (and submodules) into ``sys.modules``; returns the
    fake slicer namespace with ``dialogs`` recording every message box."""
    import contextlib
    import types
    import unittest

    fake = makeFakeSlicer()
    scene = fake.mrmlScene
    scene.StartCloseEvent, scene.EndCloseEvent = "StartCloseEvent", "EndCloseEvent"
    scene.GetFirstNodeByClass = lambda className: next(
        (n for n in scene.nodes if className == "vtkMRMLScalarVolumeNode" and type(n) is FakeVolumeNode), None)
    dialogs: list[tuple[str, str]] = []
    uiFile = MODULE_DIR / "Resources" / "UI" / "SAM2UNetSlicer.ui"

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as err:
            dialogs.append(("error", f"{message}\n\n{err}"))
            raise

    util = fake.util
    util.loadUI = lambda path: FakeWidget("SAM2UNetSlicer", "qMRMLWidget") if Path(path) == uiFile else None
    util.childWidgetVariables = lambda widget: SimpleNamespace(**uiWidgetsFromFile(uiFile))
    util.tryWithErrorDisplay = tryWithErrorDisplay
    util.errorDisplay = lambda text, **kwargs: dialogs.append(("error", text))
    util.infoDisplay = lambda text, **kwargs: dialogs.append(("info", text))
    util.confirmOkCancelDisplay = lambda text, **kwargs: dialogs.append(("confirm", text)) or confirm
    util.VTKObservationMixin = FakeObservationMixin
    fake.dialogs = dialogs
    fake.app = SimpleNamespace(processEvents=lambda: None, setOverrideCursor=lambda cursor: None,
                               restoreOverrideCursor=lambda: None)
    fake.vtkMRMLScalarVolumeNode, fake.vtkMRMLSegmentationNode = FakeVolumeNode, FakeSegmentationNode
    fake.parameterNode = FakeParameterNode()

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent or SimpleNamespace(isEntered=True)
            self.layout = SimpleNamespace(addWidget=lambda widget: None)

        def setup(self) -> None:
            pass

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self) -> FakeParameterNode:
            return fake.parameterNode

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    slicerModule = types.ModuleType("slicer")
    slicerModule.__dict__.update(vars(fake))
    submodules = {
        "slicer.i18n": {"tr": lambda text: text, "translate": lambda context, text: text},
        "slicer.parameterNodeWrapper": {"parameterNodeWrapper": fakeParameterNodeWrapper,
                                        "Minimum": lambda minimum: ("Minimum", minimum)},
        "slicer.ScriptedLoadableModule": {"ScriptedLoadableModule": ScriptedLoadableModule,
                                          "ScriptedLoadableModuleWidget": ScriptedLoadableModuleWidget,
                                          "ScriptedLoadableModuleLogic": ScriptedLoadableModuleLogic,
                                          "ScriptedLoadableModuleTest": ScriptedLoadableModuleTest},
        "slicer.util": vars(util) | {name: getattr(util, name) for name in dir(util) if not name.startswith("_")},
    }
    monkeypatch.setitem(sys.modules, "slicer", slicerModule)
    for name, contents in submodules.items():
        module = types.ModuleType(name)
        module.__dict__.update(contents)
        monkeypatch.setitem(sys.modules, name, module)
    qtModule = types.ModuleType("qt")
    qtModule.QTimer, qtModule.QSettings = FakeTimer, FakeSettings
    qtModule.Qt = SimpleNamespace(WaitCursor="WaitCursor")
    vtkModule = types.ModuleType("vtk")
    vtkModule.vtkMatrix4x4, vtkModule.vtkStringArray = FakeMatrix4x4, FakeStringArray
    vtkModule.vtkCommand = SimpleNamespace(ModifiedEvent="ModifiedEvent")
    monkeypatch.setitem(sys.modules, "qt", qtModule)
    monkeypatch.setitem(sys.modules, "vtk", vtkModule)
    monkeypatch.delitem(sys.modules, "SAM2UNetSlicer", raising=False)
    monkeypatch.setattr(FakeSettings, "store", {})
    return slicerModule
