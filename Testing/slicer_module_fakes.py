"""Fakes of the modules SAM2UNetSlicer.py itself imports: ``slicer`` (with ``i18n``,
``parameterNodeWrapper``, ``ScriptedLoadableModule``, ``util``), ``qt`` and ``vtk``, plus
widgets named as in the .ui file. They build on the scene fakes of ``slicer_fakes``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from slicer_fakes import (
    MODULE_DIR,
    FakeMatrix4x4,
    FakeNode,
    FakeSegmentationNode,
    FakeStringArray,
    FakeVolumeNode,
    makeFakeSlicer,
)


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
        self.items: list = []  # a QListWidget's items
        self.currentRow = -1

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
        self.items = []

    def addItem(self, item) -> None:
        """QListWidget.addItem: a text or a ``FakeListItem``."""
        self.items.append(item if isinstance(item, FakeListItem) else FakeListItem(item))

    @property
    def count(self) -> int:
        return len(self.items)

    def item(self, row: int) -> "FakeListItem":
        return self.items[row]

    def blockSignals(self, block: bool) -> bool:
        return False

    def toPlainText(self) -> str:
        return "\n".join(self.lines)

    def addCurrentPathToHistory(self) -> None:
        self.historyAdds += 1

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def model(self) -> "FakeItemModel":
        """A QComboBox's QStandardItemModel (items made on first use: the fake
        parameter node wrapper does not fill the combo box)."""
        if not hasattr(self, "_model"):
            self._model = FakeItemModel()
        return self._model


class FakeListItem:
    """A QListWidgetItem: its text and, for a checkable one, its check state."""

    def __init__(self, text: str) -> None:
        self._text, self.flags, self.state = text, 0, 0

    def text(self) -> str:
        return self._text

    def setFlags(self, flags: int) -> None:
        self.flags = flags

    def setCheckState(self, state: int) -> None:
        self.state = state

    def checkState(self) -> int:
        return self.state


class FakeItem:
    """A QStandardItem: only whether it can be chosen."""

    def __init__(self) -> None:
        self.enabled = True

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def isEnabled(self) -> bool:
        return self.enabled


class FakeItemModel:
    def __init__(self) -> None:
        self.items: dict[int, FakeItem] = {}

    def item(self, row: int) -> FakeItem:
        return self.items.setdefault(row, FakeItem())


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
    path = "/nonexistent/slicer.org/Slicer.ini"

    def fileName(self) -> str:
        return self.path

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
    volumeClasses = {"vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode"}
    subclasses = {"vtkMRMLScalarVolumeNode": volumeClasses}  # as MRML's class hierarchy (the part used)

    def getNodesByClass(className: str, scene=None) -> list[FakeNode]:
        """Like slicer.util.getNodesByClass: nodes of ``className`` or one of its subclasses."""
        return [n for n in fake.mrmlScene.nodes if n.GetClassName() in subclasses.get(className, {className})]

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
    util.getNodesByClass = getNodesByClass
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
                                        "Minimum": lambda minimum: ("Minimum", minimum),
                                        "WithinRange": lambda minimum, maximum: ("WithinRange", minimum, maximum)},
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
    qtModule.QTimer, qtModule.QSettings, qtModule.QListWidgetItem = FakeTimer, FakeSettings, FakeListItem
    qtModule.Qt = SimpleNamespace(WaitCursor="WaitCursor", Unchecked=0, Checked=2, ItemIsUserCheckable=16,
                                  ItemIsEnabled=32)
    vtkModule = types.ModuleType("vtk")
    vtkModule.vtkMatrix4x4, vtkModule.vtkStringArray = FakeMatrix4x4, FakeStringArray
    vtkModule.vtkCommand = SimpleNamespace(ModifiedEvent="ModifiedEvent")
    monkeypatch.setitem(sys.modules, "qt", qtModule)
    monkeypatch.setitem(sys.modules, "vtk", vtkModule)
    monkeypatch.delitem(sys.modules, "SAM2UNetSlicer", raising=False)
    monkeypatch.setattr(FakeSettings, "store", {})
    return slicerModule
