"""Install decisions of SAM2UNetSlicer: what goes through PyTorchUtils, what through pip, that
sam2unet_core comes from the extension at its version, and that Slicer's own numpy,
SimpleITK, pydicom and pillow are never replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from slicer_fakes import MODULE_DIR, FakeRunner
from SAM2UNetSlicerLib.InstallLogic import (
    PROTECTED_PACKAGES,
    CoreSource,
    DependencyInstaller,
    EnsureOutcome,
    ModelRoute,
    PipStepSequence,
    TorchAction,
    constraintLines,
    installedVersions,
    pipCommand,
    planInstall,
    readRequirements,
    routeRequirements,
)

RESOURCES = MODULE_DIR / "Resources"
REQUIREMENTS = routeRequirements(ModelRoute.torch, RESOURCES)  # requirements.txt + requirements-torchfree.txt
# What a fresh Slicer holds (canonical names): its own numpy, SimpleITK, pydicom and pillow.
FRESH_SLICER = {"numpy": "1.26.4", "simpleitk": "2.4.0", "pydicom": "2.4.4", "pillow": "10.4.0", "pip": "24.0"}
SLICER_OWN = {"pillow", "pydicom"}  # on the torch-free list for a Python that lacks them
CORE = CoreSource(Path("/opt/Slicer/lib/qt-scripted-modules/sam2unet_core_source"), "0.1.0")


def everythingInstalled() -> dict[str, str]:
    installed = dict(FRESH_SLICER, torch="2.5.1+cu124", sam2="1.1.0", **{"sam2unet-core": CORE.version})
    for requirement in REQUIREMENTS:
        parsed = Requirement(requirement)
        installed[parsed.name.lower()] = str(next(iter(parsed.specifier)).version)  # the minimum itself
    return installed


def allPipArguments(plan) -> list[str]:
    return [arg for step in plan.steps for arg in step.pipArgs]


def test_module_requirements_parse_and_leave_slicer_packages_alone() -> None:
    assert REQUIREMENTS, "Resources/requirements*.txt list nothing"
    names = {Requirement(line).name.lower() for line in REQUIREMENTS}
    assert names & {name.lower() for name in PROTECTED_PACKAGES} == SLICER_OWN
    assert "safetensors" in names and "hydra-core" in names
    assert not names & {"monai", "highdicom", "scipy", "scikit-image"}  # the module's run never needs them

def test_fresh_slicer_gets_torch_from_pytorchutils_then_two_pip_steps() -> None:
    requirements = REQUIREMENTS + ["numpy>=2.0", "SimpleITK>=2.5", "torch>=2.6"]  # must never reach pip
    plan = planInstall(requirements, FRESH_SLICER, CORE, pyTorchUtilsAvailable=True)
    assert plan.torch is TorchAction.installWithPyTorchUtils
    noDeps, dependencies = plan.steps
    assert noDeps.pipArgs[:3] == ["install", "--no-deps", "--no-build-isolation"]
    assert str(CORE.path) in noDeps.pipArgs and "sam2>=1.1.0" in noDeps.pipArgs
    assert noDeps.env == {"SAM2_BUILD_CUDA": "0"}
    assert dependencies.pipArgs == ["install", *[r for r in REQUIREMENTS if Requirement(r).name not in SLICER_OWN]]
    lowered = [arg.lower() for arg in allPipArguments(plan)]
    assert not [arg for arg in lowered if arg.startswith(("numpy", "simpleitk", "torch", "pydicom", "pillow"))]
    described = plan.describe()
    assert "PyTorch extension" in described and "sam2unet_core 0.1.0" in described and "safetensors" in described
    assert "about 0.2 GB for a CPU build" in described and "Download: about 6 MB plus PyTorch" in described


def test_missing_torch_without_the_pytorch_extension_is_reported() -> None:
    plan = planInstall(REQUIREMENTS, FRESH_SLICER, CORE, pyTorchUtilsAvailable=False)
    assert plan.torch is TorchAction.needPyTorchExtension
    tooOld = dict(FRESH_SLICER, torch="2.4.1")  # present is not enough: sam2 needs >=2.5.1
    assert planInstall(REQUIREMENTS, tooOld, CORE, pyTorchUtilsAvailable=False).torch is TorchAction.needPyTorchExtension
    plan = planInstall(REQUIREMENTS, tooOld, CORE, pyTorchUtilsAvailable=True)
    assert plan.torch is TorchAction.installWithPyTorchUtils and "replacing 2.4.1" in plan.describe()


def test_nothing_to_do_when_everything_is_installed_and_recent_enough() -> None:
    plan = planInstall(REQUIREMENTS, everythingInstalled(), CORE, pyTorchUtilsAvailable=False)
    assert plan.isEmpty()
    assert plan.steps == []


def test_only_missing_or_too_old_packages_are_installed() -> None:
    installed = everythingInstalled()
    installed["nibabel"] = "4.0.2"  # requirements ask >=5.2
    del installed["safetensors"]
    plan = planInstall(REQUIREMENTS, installed, CORE, pyTorchUtilsAvailable=True)
    assert plan.torch is TorchAction.ready
    [step] = plan.steps
    assert [Requirement(arg).name for arg in step.pipArgs[1:]] == ["safetensors", "nibabel"]  # file order


def test_a_wheel_source_and_a_wheelhouse_replace_the_package_index(tmp_path: Path) -> None:
    wheel = CoreSource(tmp_path / "sam2unet_core-0.1.0-py3-none-any.whl", "0.1.0")
    installed = dict(everythingInstalled())
    del installed["sam2unet-core"], installed["safetensors"]
    plan = planInstall(REQUIREMENTS, installed, wheel, pyTorchUtilsAvailable=True, wheelhouse=tmp_path)
    core, dependencies = plan.steps
    offline = ["--no-index", "--find-links", str(tmp_path)]
    assert core.pipArgs == ["install", "--no-deps", "--no-build-isolation", *offline, str(wheel.path)]
    assert dependencies.pipArgs == ["install", *offline, "safetensors>=0.4"]


def test_another_installed_version_is_reinstalled_from_the_extension() -> None:
    installed = dict(everythingInstalled(), **{"sam2unet-core": "0.0.9"})
    plan = planInstall(REQUIREMENTS, installed, CORE, pyTorchUtilsAvailable=False)
    [step] = plan.steps
    assert step.pipArgs == ["install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(CORE.path)]
    assert plan.coreChange == ("0.0.9", "0.1.0")
    assert "sam2unet_core 0.1.0 from this extension, replacing 0.0.9" in plan.describe()


def test_constraints_pin_the_installed_protected_packages(tmp_path: Path) -> None:
    lines = constraintLines({"numpy": "1.26.4", "simpleitk": "2.4.0", "torch": "2.5.1+cu124", "scipy": "1.13"})
    assert lines == ["numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.5.1+cu124"]
    for line in lines:
        Requirement(line)  # valid pip syntax
    plan = planInstall(REQUIREMENTS, FRESH_SLICER, CORE, pyTorchUtilsAvailable=True)
    command = pipCommand("/opt/Slicer/bin/PythonSlicer", plan.steps[1], tmp_path / "c.txt")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "pip", "install"]
    assert command[command.index("-c") + 1] == str(tmp_path / "c.txt")


def test_installed_versions_reads_this_python() -> None:
    versions = installedVersions(["NumPy", "pytest"])
    assert versions["numpy"] == np.__version__
    assert set(versions) == {"numpy", "pytest"}


def test_pip_steps_run_in_order_and_report_success() -> None:
    runner, logs, done = FakeRunner(), [], []
    commands = [(["python", "-m", "pip", "install", "a"], {"X": "1"}), (["python", "-m", "pip", "install", "b"], {})]
    sequence = PipStepSequence(runner, commands, logs.append, lambda ok, message: done.append((ok, message)))
    sequence.start()
    assert runner.args[-1] == "a" and runner.started[0][1] == {"X": "1"}
    runner.emit("Successfully installed a-1.0")
    runner.finish(0)
    runner.poll()
    assert runner.args[-1] == "b" and done == []
    runner.finish(0)
    runner.poll()
    assert done == [(True, "Installation finished")]
    assert logs[0] == "$ python -m pip install a" and "Successfully installed a-1.0" in logs


def test_pip_failure_stops_the_sequence_with_the_last_output() -> None:
    runner, done = FakeRunner(), []
    commands = [(["pip", "install", "a"], {}), (["pip", "install", "b"], {})]
    PipStepSequence(runner, commands, lambda line: None, lambda ok, message: done.append((ok, message))).start()
    runner.emit("ERROR: Cannot install a because these package versions have conflicting dependencies.")
    runner.finish(1)
    runner.poll()
    [(ok, message)] = done
    assert not ok
    assert "exit code 1" in message and "conflicting dependencies" in message
    assert len(runner.started) == 1  # b never started


@pytest.mark.parametrize("line", ["# comment", "", "   ", "-r other.txt", "--index-url https://x"])
def test_requirement_files_skip_comments_and_options(tmp_path: Path, line: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(f"{line}\nscipy>=1.10  # trailing comment\n", encoding="utf-8")
    assert readRequirements(path) == ["scipy>=1.10"]


def test_pins_agree_with_the_project_requirements() -> None:
    """Each module requirement (both routes) has the pin of a project requirement file
    (``requirements.txt`` or a split-off one such as ``requirements-onnx.txt``)."""
    project: dict[str, set[str]] = {}
    for path in sorted(MODULE_DIR.parent.glob("requirements*.txt")):
        for line in readRequirements(path):
            project.setdefault(Requirement(line).name.lower(), set()).add(str(Requirement(line).specifier))
    for line in REQUIREMENTS + routeRequirements(ModelRoute.onnx, RESOURCES):
        requirement = Requirement(line)
        assert str(requirement.specifier) in project[requirement.name.lower()], line


def _closure(roots: list[str]) -> set[str]:
    """Canonical names of ``roots`` and everything they require, as installed here."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [Requirement(root).name for root in roots]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _top_level_modules_after(imports: str) -> list[str]:
    """The top-level module names loaded in a fresh Python after ``import <imports>``."""
    import json
    import subprocess
    import sys

    code = (f"import json, sys; import {imports}; "
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    output = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR.parent, capture_output=True,
                            text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_what_the_inference_path_imports_is_installed_by_the_module() -> None:
    """Import the CLI and the engine in a fresh Python and check that every third-party
    distribution they load comes with the module's install (requirements, sam2, or what
    Slicer and the PyTorch extension already hold)."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    modules = _top_level_modules_after("sam2unet_core.cli.predict, sam2unet_core.inference.engine, "
                                       "sam2unet_core.checkpoint, sam2unet_core.io")
    providers = importlib.metadata.packages_distributions()
    loaded = {canonicalize_name(dist) for module in modules for dist in providers.get(module, [])}
    slicerBundled = ["requests"]  # in every Slicer; pydicom.data imports it when present
    # Imported only when present (a run without them works: test_slicer_torch_free blocks them):
    optional = {"pyjpegls", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",  # pydicom's plugins
                "scipy"}  # nibabel's optional_package
    covered = _closure(REQUIREMENTS + ["sam2", *PROTECTED_PACKAGES, *slicerBundled]) | {"sam2unet-core", "pip", "setuptools"}
    assert loaded - covered - optional == set()


class InstallerHarness:
    def __init__(self, installed: dict[str, str], importable: set[str], confirm: bool = True) -> None:
        self.installed = installed
        self.runner = FakeRunner()
        self.installer = DependencyInstaller(self.runner, RESOURCES,
                                             lambda: "/opt/Slicer/bin/PythonSlicer", lambda name: name in importable,
                                             lambda: dict(self.installed), environment={"PATH": "/bin"})
        self.confirm = confirm
        self.asked: list[str] = []
        self.torchInstalls = 0
        self.done: list[tuple[bool, str]] = []

    def installTorch(self) -> None:
        self.torchInstalls += 1
        self.installed["torch"] = "2.5.1"

    def ensure(self) -> EnsureOutcome:
        return self.installer.ensure(CORE, lambda text: self.asked.append(text) or self.confirm,
                                     self.installTorch, lambda line: None, lambda ok, message: self.done.append((ok, message)))


def test_installer_outcomes_before_any_pip_call() -> None:
    ready = InstallerHarness(everythingInstalled(), {"sam2unet_core"})
    assert ready.ensure() is EnsureOutcome.ready and ready.asked == []
    noTorch = InstallerHarness(dict(FRESH_SLICER), set())
    assert noTorch.ensure() is EnsureOutcome.needPyTorchExtension and noTorch.asked == []
    declined = InstallerHarness(dict(FRESH_SLICER), {"PyTorchUtils"}, confirm=False)
    assert declined.ensure() is EnsureOutcome.declined
    assert declined.torchInstalls == 0 and declined.runner.started == []
    onlyTorch = InstallerHarness({k: v for k, v in everythingInstalled().items() if k != "torch"}, {"sam2unet_core", "PyTorchUtils"})
    assert onlyTorch.ensure() is EnsureOutcome.ready and onlyTorch.torchInstalls == 1


def test_installer_runs_pip_after_torch_and_cleans_up() -> None:
    harness = InstallerHarness(dict(FRESH_SLICER), {"PyTorchUtils"})
    assert harness.ensure() is EnsureOutcome.installing
    assert harness.torchInstalls == 1 and harness.installer.isRunning()
    args, env = harness.runner.started[0]
    constraintsPath = Path(args[args.index("-c") + 1])
    assert "torch==2.5.1" in constraintsPath.read_text(encoding="utf-8").split()  # pinned after its install
    assert env == {"PATH": "/bin", "SAM2_BUILD_CUDA": "0"}
    with pytest.raises(RuntimeError, match="already running"):
        harness.ensure()
    harness.runner.finish(0)
    harness.runner.poll()
    harness.runner.finish(0)
    harness.runner.poll()
    assert harness.done == [(True, "Installation finished")]
    assert not harness.installer.isRunning() and not constraintsPath.exists()


def test_installer_cancel_stops_pip_and_removes_its_files() -> None:
    harness = InstallerHarness(dict(FRESH_SLICER, torch="2.5.1"), set())
    assert harness.ensure() is EnsureOutcome.installing
    args, _ = harness.runner.started[0]
    harness.installer.cancel()
    assert harness.runner.cancelled == 1 and not harness.installer.isRunning()
    assert not Path(args[args.index("-c") + 1]).exists()
    assert harness.done == []


# ------------------------------------------------------------------------------ ONNX route
ONNX_REQUIREMENTS = routeRequirements(ModelRoute.onnx, RESOURCES)
HEAVY = {"torch", "torchvision", "sam2", "monai", "hydra-core", "iopath"}


def test_route_follows_the_model_file() -> None:
    from SAM2UNetSlicerLib.InstallLogic import routeOf

    assert routeOf(Path("model.onnx")) is routeOf(Path("MODEL.ONNX")) is ModelRoute.onnx
    assert {routeOf(Path(f"m.{suffix}")) for suffix in ("safetensors", "pt", "pth")} == {ModelRoute.torch}
    assert routeOf(None) is ModelRoute.torch


def test_onnx_route_installs_onnxruntime_and_the_torch_free_list_only() -> None:
    assert ONNX_REQUIREMENTS[0] == "onnxruntime>=1.17"
    torchFree = readRequirements(RESOURCES / "requirements-torchfree.txt")
    assert ONNX_REQUIREMENTS[1:] == torchFree and set(torchFree) < set(REQUIREMENTS)  # one list, both routes
    names = {Requirement(line).name.lower() for line in ONNX_REQUIREMENTS}
    assert not names & HEAVY and names & {name.lower() for name in PROTECTED_PACKAGES} == SLICER_OWN
    # Nothing on the list pulls torch in: the closure of what is installed here.
    assert not _closure(ONNX_REQUIREMENTS) & {"torch", "torchvision", "sam2", "monai"}


def test_fresh_slicer_with_an_onnx_model_gets_no_pytorch_step() -> None:
    for pyTorchUtils in (False, True):  # the PyTorch extension is neither needed nor used
        plan = planInstall(ONNX_REQUIREMENTS, FRESH_SLICER, CORE, pyTorchUtilsAvailable=pyTorchUtils,
                           route=ModelRoute.onnx)
        assert plan.torch is TorchAction.notNeeded
        noDeps, dependencies = plan.steps
        assert noDeps.pipArgs == ["install", "--no-deps", "--no-build-isolation", str(CORE.path)]
        assert noDeps.env == {}  # no sam2 to build
        assert dependencies.pipArgs == ["install", *[r for r in ONNX_REQUIREMENTS if Requirement(r).name not in SLICER_OWN]]
        names = {Requirement(arg).name.lower() for arg in dependencies.pipArgs[1:]}
        assert not names & (HEAVY | {"numpy", "simpleitk", "pydicom", "pillow"})
        described = plan.describe()
        assert "onnxruntime>=1.17" in described and "no PyTorch" in described and "PyTorch extension" not in described


def test_onnx_route_after_the_pytorch_route_adds_only_onnxruntime() -> None:
    plan = planInstall(ONNX_REQUIREMENTS, everythingInstalled(), CORE, pyTorchUtilsAvailable=False,
                       route=ModelRoute.onnx)
    [step] = plan.steps
    assert step.pipArgs == ["install", "onnxruntime>=1.17"]
    installed = dict(everythingInstalled(), onnxruntime="1.20.1")
    del installed["torch"], installed["sam2"]  # torch route packages do not matter here
    assert planInstall(ONNX_REQUIREMENTS, installed, CORE, pyTorchUtilsAvailable=False,
                       route=ModelRoute.onnx).isEmpty()
    gpuBuild = dict(installed, **{"onnxruntime-gpu": "1.20.1"})
    del gpuBuild["onnxruntime"]  # the user's onnxruntime-gpu: the CPU build must not go over it
    assert planInstall(ONNX_REQUIREMENTS, gpuBuild, CORE, pyTorchUtilsAvailable=False,
                       route=ModelRoute.onnx).isEmpty()
    gpuBuild["onnxruntime-gpu"] = "1.16.3"  # too old: the requirement stands
    assert planInstall(ONNX_REQUIREMENTS, gpuBuild, CORE, pyTorchUtilsAvailable=False,
                       route=ModelRoute.onnx).steps[0].pipArgs == ["install", "onnxruntime>=1.17"]


def test_what_the_onnx_inference_path_imports_is_installed_by_the_onnx_route() -> None:
    """Import what the Slicer module runs for an .onnx model (the predict CLI, ONNX Runtime
    runner, describe CLI) in a fresh Python: no torch, and every third-party distribution
    loaded comes with the ONNX route (its requirements, or what Slicer already holds)."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    modules = _top_level_modules_after("sam2unet_core.cli.predict, sam2unet_core.cli.describe, "
                                       "sam2unet_core.inference.onnx_runner, sam2unet_core.io, onnxruntime")
    assert not {"torch", "monai", "sam2"} & set(modules)
    providers = importlib.metadata.packages_distributions()
    loaded = {canonicalize_name(dist) for module in modules for dist in providers.get(module, [])}
    slicerBundled = ["requests"]  # in every Slicer; pydicom.data imports it when present
    # Imported only when present (test_slicer_torch_free runs the ONNX route with them blocked):
    optional = {"pyjpegls", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",  # pydicom's plugins
                "scipy"}  # nibabel's optional_package
    covered = _closure(ONNX_REQUIREMENTS + [*PROTECTED_PACKAGES, *slicerBundled]) | {"sam2unet-core", "pip", "setuptools"}
    assert loaded - covered - optional == set()


def test_installer_on_the_onnx_route_needs_neither_torch_nor_the_pytorch_extension() -> None:
    harness = InstallerHarness(dict(FRESH_SLICER), set())  # no torch, no PyTorchUtils
    outcome = harness.installer.ensure(CORE, lambda text: harness.asked.append(text) or True,
                                       harness.installTorch, lambda line: None,
                                       lambda ok, message: harness.done.append((ok, message)), ModelRoute.onnx)
    assert outcome is EnsureOutcome.installing and harness.torchInstalls == 0
    [asked] = harness.asked
    assert "no PyTorch" in asked
    args, env = harness.runner.started[0]
    assert env == {"PATH": "/bin"} and "sam2>=1.1.0" not in args
    harness.runner.finish(0)
    harness.runner.poll()
    args, _ = harness.runner.started[1]
    assert "onnxruntime>=1.17" in args
    harness.runner.finish(0)
    harness.runner.poll()
    assert harness.done == [(True, "Installation finished")]


# ------------------------------------------------------------------- what the PyTorch route needs
# A Slicer with only what the PyTorch route installs (no keep-largest-component): MONAI,
# scikit-image, scipy, highdicom and slicerio cannot be imported in the child process.
PYTORCH_ROUTE_SITECUSTOMIZE = r'''
import importlib.abc
import sys

BLOCKED = {"monai", "skimage", "scipy", "highdicom", "slicerio"}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the PyTorch route)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''


def test_the_modules_pytorch_run_needs_nothing_the_route_leaves_out(grey_ct_checkpoint: Path, tmp_path: Path) -> None:
    """The exact command the module starts, on a real NIfTI, succeeds without MONAI, scipy,
    highdicom or scikit-image; keep-largest-component then says which package it needs."""
    import os
    import subprocess
    import sys

    import nibabel as nib

    from SAM2UNetSlicerLib.Parameters import RunParameters, buildPredictArgs

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(PYTORCH_ROUTE_SITECUSTOMIZE, encoding="utf-8")
    scan = tmp_path / "input.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(40, 200, (24, 20, 3)).astype(np.int16), np.eye(4)), scan)
    env = dict(os.environ, PYTHONPATH=f"{blocker}:{MODULE_DIR.parent}", PYTHONUNBUFFERED="1")
    args = buildPredictArgs(sys.executable, scan, tmp_path / "out", RunParameters(grey_ct_checkpoint))
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "input.nii.gz").is_file()
    assert "No module named" not in done.stderr

    largest = buildPredictArgs(sys.executable, scan, tmp_path / "largest", RunParameters(
        grey_ct_checkpoint, keepLargestComponent=True))
    done = subprocess.run(largest, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "'monai' is not installed" in done.stdout + done.stderr
    names = {Requirement(line).name for line in routeRequirements(ModelRoute.torch, RESOURCES, keepLargestComponent=True)}
    assert {"monai", "scikit-image"} <= names


def test_torch_left_too_old_by_the_pytorch_extension_stops_before_pip() -> None:
    harness = InstallerHarness(dict(FRESH_SLICER, torch="2.4.1"), {"PyTorchUtils"})
    harness.installTorch = lambda: None  # PyTorchUtils kept the old build
    with pytest.raises(RuntimeError, match=r"PyTorch 2\.4\.1 after the PyTorch extension's install; "
                                           r"SAM2-UNet needs torch>=2\.5\.1"):
        harness.ensure()
    assert harness.runner.started == [] and not harness.installer.isRunning()
