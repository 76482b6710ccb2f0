"""Decide and run the first-use installation of ``sam2unet_core`` into Slicer's Python.

Two routes, chosen by the model file (``routeOf``):
    * PyTorch (``.safetensors``, ``.pt``, ``.pth``): torch through the PyTorch extension,
      ``sam2unet_core`` and ``sam2`` with ``--no-deps``, then ``Resources/requirements.txt``
      and ``Resources/requirements-torchfree.txt`` (plus ``requirements-postprocess.txt``,
      MONAI and scikit-image, only when the run keeps the largest connected component).
    * ONNX (``.onnx``): ``sam2unet_core`` with ``--no-deps``, then ``onnxruntime`` and
      ``Resources/requirements-torchfree.txt``; no torch, no sam2, no PyTorch extension.

Rules:
    * ``sam2unet_core`` comes from the extension itself (``findBundledCore``: the source tree
      the CMake install puts beside the module, or the clone the module runs from), never
      from a package index. Its version is known; another installed version is reported
      (``coreVersionProblem``) and replaced with ``--force-reinstall`` on confirmation.
    * torch comes from the PyTorch extension (``PyTorchUtils.installTorch`` picks the CUDA
      build that fits the driver) and must satisfy ``TORCH_REQUIREMENT``; it is never
      pip-installed here.
    * What Slicer ships and uses (numpy, SimpleITK, pydicom, pillow; torch and torchvision
      once present) is never replaced: pip gets a constraints file pinning the installed
      versions, so a dependency that would need another version makes pip stop with a clear
      conflict instead of breaking Slicer.
    * A folder of wheels (``wheelhouse``) makes every pip call offline: ``--no-index
      --find-links FOLDER``.
    * The confirmation states the download size, from ``DOWNLOAD_MB`` (measured wheel sizes).
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
    "CORE_DISTRIBUTION",
    "BUNDLE_FOLDER",
    "CoreSource",
    "readCoreVersion",
    "findBundledCore",
    "resolvePackageSource",
    "coreVersionProblem",
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
    "DOWNLOAD_MB",
    "readRequirements",
    "installedVersions",
    "planInstall",
    "constraintLines",
    "pipCommand",
    "PipStepSequence",
    "EnsureOutcome",
    "DependencyInstaller",
]

# What Slicer ships and its modules use: pinned at the installed version, never replaced.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "pydicom", "pillow", "torch", "torchvision")
NEVER_PIP_INSTALLED = ("numpy", "SimpleITK", "torch", "torchvision")  # Slicer's, or the PyTorch extension's
CORE_DISTRIBUTION = "sam2unet-core"  # canonical distribution name of sam2unet_core
BUNDLE_FOLDER = "sam2unet_core_source"  # beside the module script, written by the CMake install
SAM2_REQUIREMENT = "sam2>=1.1.0"
TORCH_REQUIREMENT = ">=2.5.1"  # what sam2 1.1.0 and the model code need
ONNXRUNTIME_REQUIREMENT = "onnxruntime>=1.17"  # the CPU build
# Other builds that provide the same ``onnxruntime`` module: one of them installed satisfies
# ONNXRUNTIME_REQUIREMENT (pip must not add the CPU build over onnxruntime-gpu).
ONNXRUNTIME_BUILDS = ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
TORCH_FREE_FILE = "requirements-torchfree.txt"  # under Resources/: what both routes need
TORCH_ROUTE_FILES = ("requirements.txt", TORCH_FREE_FILE)
POSTPROCESS_FILE = "requirements-postprocess.txt"  # keep-largest-component (PyTorch route)
# Download of each requirement with the dependencies only it brings, in MB: Linux x86-64
# CPython 3.11 wheels (pip download, 2026-12). Other platforms differ by a few MB.
DOWNLOAD_MB = {
    "onnxruntime": 28.2,  # with flatbuffers and protobuf
    "pillow": 7.1, "pydicom": 2.4, "nibabel": 3.4, "tqdm": 0.1,
    "hydra-core": 0.4,  # with omegaconf and the antlr4 runtime
    "iopath": 0.2, "safetensors": 0.5, "pyyaml": 0.8, "sam2": 0.2,
    "monai": 1.7, "scikit-image": 51.7,  # scikit-image with scipy, networkx, imageio, tifffile
}
TORCH_DOWNLOAD_TEXT = "about 0.2 GB for a CPU build, about 2.7 GB for a CUDA build with its NVIDIA libraries"


@dataclass(frozen=True)
class CoreSource:
    """Where ``sam2unet_core`` is installed from (a wheel, or a source folder with
    ``setup.py``) and the version it holds."""

    path: Path
    version: str


def readCoreVersion(path: Path) -> str:
    """The ``sam2unet_core`` version of a wheel (its file name) or a source folder (the
    ``__version__`` line of ``sam2unet_core/__init__.py``); ``ValueError`` otherwise."""
    path = Path(path)
    if path.suffix == ".whl":
        match = re.match(r"sam2unet_core-([^-]+)-", path.name)
        if match:
            return match.group(1)
        raise ValueError(f"{path} is not a sam2unet_core wheel")
    init = path / "sam2unet_core" / "__init__.py"
    if (path / "setup.py").is_file() and init.is_file():
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    raise ValueError(f"{path} holds neither a sam2unet_core wheel nor its source (setup.py and sam2unet_core/)")


def _coreIn(folder: Path) -> CoreSource | None:
    """The newest sam2unet_core wheel in ``folder``, else the source tree ``folder`` is, else None."""
    wheels = sorted(Path(folder).glob("sam2unet_core-*.whl"))
    candidates = [wheels[-1]] if wheels else [Path(folder)]
    for candidate in candidates:
        try:
            return CoreSource(candidate, readCoreVersion(candidate))
        except ValueError:
            continue
    return None


def findBundledCore(moduleDir: Path) -> CoreSource | None:
    """The copy of ``sam2unet_core`` the extension carries: ``BUNDLE_FOLDER`` beside the
    module (an installed extension), or the repository the module runs from (a clone added
    to Slicer's module paths). None when neither is there."""
    moduleDir = Path(moduleDir).resolve()
    for folder in (moduleDir / BUNDLE_FOLDER, moduleDir.parent):
        if folder.is_dir():
            found = _coreIn(folder)
            if found is not None:
                return found
    return None


def resolvePackageSource(text: str, moduleDir: Path) -> tuple[CoreSource, Path | None]:
    """``(core, wheelhouse)`` for the panel's *Package source* field.

    Empty: the extension's own copy, third-party packages from the package index. A wheel or
    a source folder of sam2unet_core: that copy. Any other folder: a wheelhouse for sites
    without internet (every pip call uses only it), sam2unet_core from a wheel in it or else
    from the extension. ``ValueError`` says what is missing.
    """
    text = text.strip()
    wheelhouse = None
    if text:
        path = Path(text).expanduser()
        if not path.exists():
            raise ValueError(f"package source {path} does not exist")
        core = _coreIn(path) if path.is_dir() else CoreSource(path, readCoreVersion(path))
        if path.is_dir() and not (path / "setup.py").is_file():
            wheelhouse = path
        if core is not None:
            return core, wheelhouse
    bundled = findBundledCore(moduleDir)
    if bundled is None:
        raise ValueError(f"this extension carries no copy of sam2unet_core ({Path(moduleDir) / BUNDLE_FOLDER} "
                         f"is missing); set Advanced > Package source to a sam2unet_core wheel or source folder")
    return bundled, wheelhouse


def coreVersionProblem(installed: Mapping[str, str], core: CoreSource) -> str | None:
    """A sentence when the installed sam2unet_core is another version than ``core``; None
    when it is the same or not installed at all."""
    version = installed.get(CORE_DISTRIBUTION)
    if version is None or version == core.version:
        return None
    return (f"sam2unet_core {version} is installed, but this extension carries {core.version}: "
            f"press Upgrade / Reinstall (Advanced), then restart Slicer")


class ModelRoute(enum.Enum):
    """How a model runs, and so what the first use installs."""

    torch = "torch"  # .safetensors, .pt, .pth: PyTorch (extension), sam2, MONAI
    onnx = "onnx"  # .onnx: ONNX Runtime only, no torch


def routeOf(modelPath: Path | None) -> ModelRoute:
    """``ModelRoute.onnx`` for a ``.onnx`` file, else the PyTorch route (also for no file yet)."""
    return ModelRoute.onnx if modelPath is not None and Path(modelPath).suffix.lower() == ".onnx" else ModelRoute.torch


def routeRequirements(route: ModelRoute, resources: Path, keepLargestComponent: bool = False) -> list[str]:
    """The pip requirements of ``route`` besides ``sam2unet_core`` (and sam2, torch), read
    from the module's ``Resources`` folder: the torch-free list is shared by both routes;
    ``keepLargestComponent`` adds MONAI and scikit-image to the PyTorch route."""
    if route is ModelRoute.onnx:
        return [ONNXRUNTIME_REQUIREMENT, *readRequirements(Path(resources) / TORCH_FREE_FILE)]
    files = (*TORCH_ROUTE_FILES, POSTPROCESS_FILE) if keepLargestComponent else TORCH_ROUTE_FILES
    return [line for name in files for line in readRequirements(Path(resources) / name)]


class TorchAction(enum.Enum):
    ready = "ready"  # torch is installed at a version the model code supports
    installWithPyTorchUtils = "installWithPyTorchUtils"  # missing or too old: the PyTorch extension installs it
    needPyTorchExtension = "needPyTorchExtension"  # tell the user to install the extension
    notNeeded = "notNeeded"  # an ONNX model: torch is never installed


@dataclass
class PipStep:
    """One ``python -m pip`` call: ``pipArgs`` follow ``pip``; ``env`` adds variables;
    ``packages`` are the requirements it installs (for the dialog and the download size)."""

    description: str
    pipArgs: list[str]
    env: dict[str, str] = field(default_factory=dict)
    packages: list[str] = field(default_factory=list)


@dataclass
class InstallPlan:
    torch: TorchAction
    steps: list[PipStep]
    torchFound: str | None = None  # the installed torch version, when there is one
    coreChange: tuple[str, str] | None = None  # (installed, extension's) sam2unet_core versions

    def isEmpty(self) -> bool:
        return self.torch in (TorchAction.ready, TorchAction.notNeeded) and not self.steps

    def downloadMegabytes(self) -> float:
        """Estimated download of the pip steps (``DOWNLOAD_MB``; sam2unet_core comes with the
        extension, torch is counted apart)."""
        return sum(DOWNLOAD_MB.get(_requirementName(req), 0.0) for step in self.steps for req in step.packages)

    def describe(self) -> str:
        """Text for the confirmation dialog, with the download size."""
        lines = []
        if self.torch is TorchAction.installWithPyTorchUtils:
            found = f" (replacing {self.torchFound}, older than torch{TORCH_REQUIREMENT})" if self.torchFound else ""
            lines.append(f"PyTorch{found}, through the PyTorch extension (a CUDA build when an NVIDIA GPU is "
                         f"found): {TORCH_DOWNLOAD_TEXT}")
        if self.coreChange is not None:
            lines.append(f"sam2unet_core {self.coreChange[1]} from this extension, replacing {self.coreChange[0]}")
        for step in self.steps:
            lines.append(f"{step.description}: {' '.join(step.packages)}")
        if self.torch is TorchAction.notNeeded:
            lines.append("no PyTorch: the ONNX model runs with ONNX Runtime")
        size = self.downloadMegabytes()
        total = f"Download: about {size:.0f} MB" if size >= 1 else "Download: under 1 MB"
        if self.torch is TorchAction.installWithPyTorchUtils:
            total += " plus PyTorch"
        return "\n".join([*(f"  - {line}" for line in lines), total])


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


def planInstall(requirements: list[str], installed: dict[str, str], core: CoreSource,
                pyTorchUtilsAvailable: bool, route: ModelRoute = ModelRoute.torch,
                wheelhouse: Path | None = None) -> InstallPlan:
    """What must be installed before the first run.

    ``requirements`` are the route's (``routeRequirements``); ``installed`` maps canonical
    names to versions (``installedVersions()``); ``core`` is where sam2unet_core comes from
    (installed when missing, reinstalled when another version is installed); ``wheelhouse``
    makes every pip step offline. The ONNX route never plans torch or sam2. numpy, SimpleITK,
    torch and torchvision never go through pip; pydicom and pillow are left as they are when
    installed, and installed when missing.
    """
    torchFound = installed.get("torch")
    if route is ModelRoute.onnx:
        torch = TorchAction.notNeeded
    elif torchFound is not None and _versionSatisfies(f"torch{TORCH_REQUIREMENT}", torchFound):
        torch = TorchAction.ready
    elif pyTorchUtilsAvailable:
        torch = TorchAction.installWithPyTorchUtils
    else:
        torch = TorchAction.needPyTorchExtension
    offline = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse is not None else []

    steps = []
    coreVersion = installed.get(CORE_DISTRIBUTION)
    coreChange = (coreVersion, core.version) if coreVersion not in (None, core.version) else None
    noDeps = [] if coreVersion == core.version else [str(core.path)]
    if route is ModelRoute.torch and not _isSatisfied(SAM2_REQUIREMENT, installed):
        noDeps.append(SAM2_REQUIREMENT)
    if noDeps:
        env = {"SAM2_BUILD_CUDA": "0"} if route is ModelRoute.torch else {}
        reinstall = ["--force-reinstall"] if coreChange else []
        steps.append(PipStep("SAM2-UNet packages (without their dependencies)",
                             ["install", "--no-deps", "--no-build-isolation", *reinstall, *offline, *noDeps], env,
                             [("sam2unet_core " + core.version) if arg == str(core.path) else arg for arg in noDeps]))
    protected = {_canonical(name) for name in PROTECTED_PACKAGES}
    never = {_canonical(name) for name in NEVER_PIP_INSTALLED}
    missing = [req for req in requirements
               if _requirementName(req) not in never
               and not (_requirementName(req) in protected and _requirementName(req) in installed)
               and not _isSatisfied(req, installed)]
    if missing:
        steps.append(PipStep("their dependencies", ["install", *offline, *missing], packages=missing))
    return InstallPlan(torch, steps, torchFound if torch is TorchAction.installWithPyTorchUtils else None, coreChange)


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
    in Slicer; asked for ``PyTorchUtils``); ``versions()`` lists installed distributions; ``environment`` is the base
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

    def plan(self, core: CoreSource, route: ModelRoute = ModelRoute.torch, wheelhouse: Path | None = None,
             keepLargestComponent: bool = False) -> InstallPlan:
        """What ``ensure`` would install now."""
        return planInstall(routeRequirements(route, self._resources, keepLargestComponent), self._versions(), core,
                           self._isImportable("PyTorchUtils"), route, wheelhouse)

    def ensure(self, core: CoreSource, confirm: Callable[[str], bool], installTorch: Callable[[], None],
               onLog: Callable[[str], None], onDone: Callable[[bool, str], None],
               route: ModelRoute = ModelRoute.torch, wheelhouse: Path | None = None,
               keepLargestComponent: bool = False) -> EnsureOutcome:
        """Install what ``route`` needs and is missing. ``confirm(planText)`` asks the user;
        ``installTorch()`` runs PyTorchUtils (blocking, raises on failure; never called on the
        ONNX route); ``onDone(ok, message)`` ends an ``installing`` outcome."""
        if self.isRunning():
            raise RuntimeError("an installation is already running")
        plan = self.plan(core, route, wheelhouse, keepLargestComponent)
        if plan.isEmpty():
            return EnsureOutcome.ready
        if plan.torch is TorchAction.needPyTorchExtension:
            return EnsureOutcome.needPyTorchExtension
        if not confirm(plan.describe()):
            return EnsureOutcome.declined
        if plan.torch is TorchAction.installWithPyTorchUtils:
            installTorch()
            torchVersion = self._versions().get("torch")
            if torchVersion is None or not _versionSatisfies(f"torch{TORCH_REQUIREMENT}", torchVersion):
                raise RuntimeError(f"PyTorch {torchVersion or 'is missing'} after the PyTorch extension's install; "
                                   f"SAM2-UNet needs torch{TORCH_REQUIREMENT}. Restart Slicer and try again.")
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
