"""Decide and run the first-use installation of ``sam2unet_core`` into Slicer's Python.

Two routes, chosen by the model file (``routeOf``):
    * PyTorch (``.safetensors``, ``.pt``, ``.pth``): torch through the PyTorch extension,
      ``sam2unet_core`` and ``sam2`` with ``--no-deps``, then ``Resources/requirements.txt``
      and ``Resources/requirements-torchfree.txt``.
    * ONNX (``.onnx``): ``sam2unet_core`` with ``--no-deps``, then ``onnxruntime`` and
      ``Resources/requirements-torchfree.txt``; no torch, no sam2, no PyTorch extension.

Rules:
    * torch comes from the PyTorch extension (``PyTorchUtils.installTorch`` picks the CUDA
      build that fits the driver); it is never pip-installed here.
    * numpy, SimpleITK, torch and torchvision already in Slicer are never replaced: pip gets
      a constraints file pinning their installed versions, so a dependency that would need
      another version makes pip stop with a clear conflict instead of breaking Slicer.
    * ``sam2unet_core`` and ``sam2`` go in with ``--no-deps`` (sam2 declares torchvision and a
      torch pin; its CUDA extension is not needed: ``SAM2_BUILD_CUDA=0``), then the
      remaining requirements of the route that are not yet satisfied.
Every pip call runs in a background process through a ``ProcessRunnerProtocol``: the panel
shows pip's output and stays responsive, on Slicer 5.10 and 5.12 alike.
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .ProcessRunner import ProcessRunnerProtocol

__all__ = [
    "PROTECTED_PACKAGES",
    "DEFAULT_CORE_SOURCE",
    "TorchAction",
    "ModelRoute",
    "routeOf",
    "routeRequirements",
    "ONNXRUNTIME_REQUIREMENT",
    "ONNXRUNTIME_BUILDS",
    "PipStep",
    "InstallPlan",
    "SAM2_REQUIREMENT",
    "TORCH_REQUIREMENT",
    "readRequirements",
    "installedVersions",
    "planInstall",
    "constraintLines",
    "pipCommand",
    "PipStepSequence",
    "EnsureOutcome",
    "DependencyInstaller",
]

PROTECTED_PACKAGES = ("numpy", "SimpleITK", "torch", "torchvision")
DEFAULT_CORE_SOURCE = "sam2unet-core"  # a PyPI name, or a local wheel/source folder (offline)
SAM2_REQUIREMENT = "sam2>=1.1.0"
TORCH_REQUIREMENT = ">=2.5.1"  # what sam2 1.1.0 needs
ONNXRUNTIME_REQUIREMENT = "onnxruntime>=1.17"  # the CPU build
# Other builds that provide the same ``onnxruntime`` module: one of them installed satisfies
# ONNXRUNTIME_REQUIREMENT (pip must not add the CPU build over onnxruntime-gpu).
ONNXRUNTIME_BUILDS = ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
TORCH_FREE_FILE = "requirements-torchfree.txt"  # under Resources/: what both routes need
TORCH_ROUTE_FILES = ("requirements.txt", TORCH_FREE_FILE)


class ModelRoute(enum.Enum):
    """How a model runs, and so what the first use installs."""

    torch = "torch"  # .safetensors, .pt, .pth: PyTorch (extension), sam2, MONAI
    onnx = "onnx"  # .onnx: ONNX Runtime only, no torch


def routeOf(modelPath: Path | None) -> ModelRoute:
    """``ModelRoute.onnx`` for a ``.onnx`` file, else the PyTorch route (also for no file yet)."""
    return ModelRoute.onnx if modelPath is not None and Path(modelPath).suffix.lower() == ".onnx" else ModelRoute.torch


def routeRequirements(route: ModelRoute, resources: Path) -> list[str]:
    """The pip requirements of ``route`` besides ``sam2unet_core`` (and sam2, torch), read
    from the module's ``Resources`` folder: the torch-free list is shared by both routes."""
    if route is ModelRoute.onnx:
        return [ONNXRUNTIME_REQUIREMENT, *readRequirements(Path(resources) / TORCH_FREE_FILE)]
    return [line for name in TORCH_ROUTE_FILES for line in readRequirements(Path(resources) / name)]


class TorchAction(enum.Enum):
    ready = "ready"  # torch is importable
    installWithPyTorchUtils = "installWithPyTorchUtils"
    needPyTorchExtension = "needPyTorchExtension"  # tell the user to install the extension
    notNeeded = "notNeeded"  # an ONNX model: torch is never installed


@dataclass
class PipStep:
    """One ``python -m pip`` call: ``pipArgs`` follow ``pip``; ``env`` adds variables."""

    description: str
    pipArgs: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class InstallPlan:
    torch: TorchAction
    steps: list[PipStep]

    def isEmpty(self) -> bool:
        return self.torch in (TorchAction.ready, TorchAction.notNeeded) and not self.steps

    def describe(self) -> str:
        """Text for the confirmation dialog."""
        lines = []
        if self.torch is TorchAction.installWithPyTorchUtils:
            lines.append("PyTorch, through the PyTorch extension (a CUDA build when an NVIDIA GPU is found)")
        for step in self.steps:
            packages = [arg for arg in step.pipArgs[1:] if not arg.startswith("-")]
            lines.append(f"{step.description}: {' '.join(packages)}")
        if self.torch is TorchAction.notNeeded:
            lines.append("no PyTorch: the ONNX model runs with ONNX Runtime")
        return "\n".join(f"  - {line}" for line in lines)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirementName(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return _canonical(match.group(1))


def readRequirements(path: Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def installedVersions(names: Iterable[str] | None = None) -> dict[str, str]:
    """Canonical distribution name -> version for what this Python has installed."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions[_canonical(name)] = dist.version
    if names is not None:
        wanted = {_canonical(n) for n in names}
        versions = {k: v for k, v in versions.items() if k in wanted}
    return versions


def _isSatisfied(requirement: str, installed: dict[str, str]) -> bool:
    name = _requirementName(requirement)
    versions = [installed.get(name)]
    if name == "onnxruntime":  # any build of it provides the module
        versions += [installed.get(build) for build in ONNXRUNTIME_BUILDS]
    return any(_versionSatisfies(requirement, version) for version in versions)


def _versionSatisfies(requirement: str, version: str | None) -> bool:
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging module: presence is all we can check
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def planInstall(requirements: list[str], installed: dict[str, str], coreInstalled: bool,
                pyTorchUtilsAvailable: bool, coreSource: str = DEFAULT_CORE_SOURCE,
                route: ModelRoute = ModelRoute.torch) -> InstallPlan:
    """What must be installed before the first run.

    ``requirements`` are the route's (``routeRequirements``); ``installed`` maps canonical
    names to versions (``installedVersions()``); ``coreInstalled`` says whether
    ``sam2unet_core`` is importable. The ONNX route never plans torch or sam2.
    """
    if route is ModelRoute.onnx:
        torch = TorchAction.notNeeded
    elif "torch" in installed:
        torch = TorchAction.ready
    elif pyTorchUtilsAvailable:
        torch = TorchAction.installWithPyTorchUtils
    else:
        torch = TorchAction.needPyTorchExtension

    steps = []
    noDeps = [] if coreInstalled else [coreSource]
    if route is ModelRoute.torch and not _isSatisfied(SAM2_REQUIREMENT, installed):
        noDeps.append(SAM2_REQUIREMENT)
    if noDeps:
        env = {"SAM2_BUILD_CUDA": "0"} if route is ModelRoute.torch else {}
        steps.append(PipStep("SAM2-UNet packages (without their dependencies)",
                             ["install", "--no-deps", "--no-build-isolation", *noDeps], env))
    protected = {_canonical(name) for name in PROTECTED_PACKAGES}
    missing = [req for req in requirements
               if _requirementName(req) not in protected and not _isSatisfied(req, installed)]
    if missing:
        steps.append(PipStep("their dependencies", ["install", *missing]))
    return InstallPlan(torch, steps)


def constraintLines(installed: dict[str, str]) -> list[str]:
    """Pins for the protected packages that are installed, e.g. ``numpy==1.26.4``."""
    return [f"{name}=={installed[_canonical(name)]}" for name in PROTECTED_PACKAGES
            if _canonical(name) in installed]


def pipCommand(python: str, step: PipStep, constraintsPath: Path) -> list[str]:
    return [python, "-m", "pip", *step.pipArgs, "-c", str(constraintsPath), "--disable-pip-version-check"]


class PipStepSequence:
    """Runs pip commands one after the other with one runner; stops at the first failure.

    ``onDone(ok, message)`` is called once, on the polling thread.
    """

    def __init__(self, runner: ProcessRunnerProtocol, commands: list[tuple[list[str], dict[str, str]]],
                 onLog: Callable[[str], None], onDone: Callable[[bool, str], None]) -> None:
        self._runner = runner
        self._commands = list(commands)
        self._onLog = onLog
        self._onDone = onDone
        self._lastLines: list[str] = []

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        if not self._commands:
            self._onDone(True, "Installation finished")
            return
        args, env = self._commands.pop(0)
        self._onLog("$ " + " ".join(args))
        self._runner.start(args, env, self._line, self._finished)

    def _line(self, line: str) -> None:
        self._lastLines = (self._lastLines + [line])[-5:]
        self._onLog(line)

    def _finished(self, returnCode: int) -> None:
        if returnCode != 0:
            self._commands = []
            tail = "\n".join(self._lastLines)
            self._onDone(False, f"pip stopped with exit code {returnCode}:\n{tail}")
            return
        self._next()


class EnsureOutcome(enum.Enum):
    ready = "ready"  # everything is installed: go ahead
    installing = "installing"  # pip runs in the background; onDone follows
    declined = "declined"  # the user said no
    needPyTorchExtension = "needPyTorchExtension"  # torch missing and no PyTorchUtils


class DependencyInstaller:
    """The first-use flow: plan, confirm, torch through PyTorchUtils, pip in the background.

    ``resources`` is the module's ``Resources`` folder (the requirement files);
    ``isImportable(name)`` tells whether a module can be imported (``importlib.util.find_spec``
    in Slicer); ``versions()`` lists installed distributions; ``environment`` is the base
    environment of the pip processes (``os.environ`` by default; never modified).
    """

    def __init__(self, runner: ProcessRunnerProtocol, resources: Path, python: Callable[[], str],
                 isImportable: Callable[[str], bool], versions: Callable[[], dict[str, str]] = installedVersions,
                 environment: Mapping[str, str] | None = None) -> None:
        self._runner = runner
        self._resources = Path(resources)
        self._python = python
        self._isImportable = isImportable
        self._versions = versions
        self._environment = environment
        self._folder: Path | None = None  # holds the constraints file while pip runs

    def isRunning(self) -> bool:
        return self._folder is not None

    def ensure(self, coreSource: str, confirm: Callable[[str], bool], installTorch: Callable[[], None],
               onLog: Callable[[str], None], onDone: Callable[[bool, str], None],
               route: ModelRoute = ModelRoute.torch) -> EnsureOutcome:
        """Install what ``route`` needs and is missing. ``confirm(planText)`` asks the user;
        ``installTorch()`` runs PyTorchUtils (blocking, raises on failure; never called on the
        ONNX route); ``onDone(ok, message)`` ends an ``installing`` outcome."""
        if self.isRunning():
            raise RuntimeError("an installation is already running")
        plan = planInstall(routeRequirements(route, self._resources), self._versions(),
                           self._isImportable("sam2unet_core"), self._isImportable("PyTorchUtils"), coreSource,
                           route)
        if plan.isEmpty():
            return EnsureOutcome.ready
        if plan.torch is TorchAction.needPyTorchExtension:
            return EnsureOutcome.needPyTorchExtension
        if not confirm(plan.describe()):
            return EnsureOutcome.declined
        if plan.torch is TorchAction.installWithPyTorchUtils:
            installTorch()
        if not plan.steps:
            return EnsureOutcome.ready
        self._folder = Path(tempfile.mkdtemp(prefix="SAM2UNetSlicer-pip-"))
        constraintsPath = self._folder / "constraints.txt"  # pins what torch install left, too
        constraintsPath.write_text("\n".join(constraintLines(self._versions())) + "\n", encoding="utf-8")
        base = dict(os.environ if self._environment is None else self._environment)
        commands = [(pipCommand(self._python(), step, constraintsPath), {**base, **step.env}) for step in plan.steps]

        def finished(ok: bool, message: str) -> None:
            self._cleanUp()
            importlib.invalidate_caches()  # let this Python see the new packages
            onDone(ok, message)

        PipStepSequence(self._runner, commands, onLog, finished).start()
        return EnsureOutcome.installing

    def cancel(self) -> None:
        """Stop pip; packages installed by finished steps stay."""
        if self.isRunning():
            self._runner.cancel()
            self._cleanUp()

    def _cleanUp(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
