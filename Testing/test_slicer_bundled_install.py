"""The extension installs the sam2unet_core it carries, offline, into a Python standing in for
Slicer's, and reports a different installed version.

The extension is laid out as its CMake install lays it out (the scripts and resources that
``SAM2UNetSlicer/CMakeLists.txt`` lists, and ``sam2unet_core_source/`` with the files of its
``CORE_BUNDLE_FILES`` and the package tree). A fresh virtualenv holds numpy, SimpleITK,
pydicom and pillow at other versions than the newest, as Slicer's Python does. The module's
``DependencyInstaller`` then runs the ONNX route with a wheelhouse (``--no-index
--find-links``) that lacks sam2unet_core, so no index knows our package: it must come from
the extension, and the four packages of Slicer must be left as they were. A second layout
carrying another version is reported as a mismatch and reinstalled on request.

Where cmake is installed, the module's real ``CMakeLists.txt`` is configured and installed
(with a stand-in for Slicer's scripted-module macro) and must give that same layout.

The wheelhouse is filled once per session with ``pip download`` (through pip's cache; the
test is skipped, saying so, when pip cannot reach the package index). About a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slicer_fakes import MODULE_DIR
from SAM2UNetSlicerLib.InstallLogic import (
    BUNDLE_FOLDER,
    CORE_DISTRIBUTION,
    DependencyInstaller,
    EnsureOutcome,
    ModelRoute,
    coreVersionProblem,
    findBundledCore,
    routeRequirements,
)
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner

REPO = MODULE_DIR.parent
# Slicer's own packages, at versions older than what pip would pick today.
SLICER_PINS = {"numpy": "1.26.4", "simpleitk": "2.3.1", "pydicom": "2.4.4", "pillow": "10.4.0"}
SLICER_REQUIREMENTS = ["numpy==1.26.4", "SimpleITK==2.3.1", "pydicom==2.4.4", "pillow==10.4.0",
                       "setuptools>=70.1"]  # Slicer's Python builds pure-Python sources with its setuptools


def _cmakeList(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.DOTALL)
    assert match, f"{variable} is not set in SAM2UNetSlicer/CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", "SAM2UNetSlicer") for item in match.group(1).split()]


def layOutInstalledExtension(destination: Path) -> Path:
    """Copy what the CMake install puts in the scripted-modules folder; returns the module folder."""
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for item in _cmakeList(cmake, "MODULE_PYTHON_SCRIPTS") + _cmakeList(cmake, "MODULE_PYTHON_RESOURCES"):
        (destination / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIR / item, destination / item)
    bundle = destination / BUNDLE_FOLDER
    assert f"sam2unet_core_source)" in cmake  # the folder the CMake install writes is InstallLogic's
    bundle.mkdir()
    for item in _cmakeList(cmake, "CORE_BUNDLE_FILES"):
        shutil.copy2(REPO / item, bundle / item)
    patterns = re.search(r"install\(DIRECTORY \$\{CORE_ROOT\}/sam2unet_core .*?FILES_MATCHING (.*?)\)", cmake,
                         re.DOTALL).group(1)
    suffixes = tuple(p.lstrip("*") for p in re.findall(r'PATTERN "(\*\.\w+)"(?! EXCLUDE)', patterns))
    assert suffixes == (".py", ".yaml", ".json")
    for path in (REPO / "sam2unet_core").rglob("*"):
        if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
            target = bundle / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return destination


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of the ONNX route's third-party packages and of Slicer's pinned packages;
    never sam2unet_core."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    requirements = routeRequirements(ModelRoute.onnx, MODULE_DIR / "Resources")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(folder),
                           *SLICER_REQUIREMENTS, *requirements], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"pip cannot fill the wheelhouse from the package index: {done.stderr.strip()[-300:]}")
    assert not list(folder.glob("sam2unet_core*"))
    return folder


def _venvVersions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name'])"
            ".lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def slicerPython(tmp_path: Path, wheelhouse: Path) -> Path:
    """A fresh virtualenv holding Slicer's own packages at older versions."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                    *SLICER_REQUIREMENTS], check=True, capture_output=True, timeout=600)
    assert {name: _venvVersions(python)[name] for name in SLICER_PINS} == SLICER_PINS
    return python


def _install(python: Path, moduleDir: Path, wheelhouse: Path) -> tuple[list[str], list[tuple[bool, str]], str]:
    """Run the module's install logic for the ONNX route; returns (dialog texts, results, log)."""
    runner = SubprocessRunner()
    installer = DependencyInstaller(runner, moduleDir / "Resources", lambda: str(python), lambda name: False,
                                    lambda: _venvVersions(python), environment=dict(os.environ, PIP_NO_INPUT="1"))
    asked: list[str] = []
    done: list[tuple[bool, str]] = []
    log: list[str] = []
    core = findBundledCore(moduleDir)
    outcome = installer.ensure(core, lambda text: asked.append(text) or True,
                               lambda: pytest.fail("the ONNX route never installs torch"), log.append,
                               lambda ok, message: done.append((ok, message)), ModelRoute.onnx, wheelhouse)
    assert outcome is EnsureOutcome.installing
    deadline = time.monotonic() + 600
    while not done and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.1)
    return asked, done, "\n".join(log)


def test_extension_installs_its_own_package_offline_and_reports_another_version(
        tmp_path: Path, wheelhouse: Path, slicerPython: Path) -> None:
    moduleDir = layOutInstalledExtension(tmp_path / "lib" / "Slicer-5.10" / "qt-scripted-modules")
    core = findBundledCore(moduleDir)
    assert core.path == moduleDir / BUNDLE_FOLDER  # the installed extension's copy, not this clone

    asked, done, log = _install(slicerPython, moduleDir, wheelhouse)
    assert done == [(True, "Installation finished")], log
    [dialog] = asked
    assert f"sam2unet_core {core.version}" in dialog and "Download: about" in dialog and "no PyTorch" in dialog
    versions = _venvVersions(slicerPython)
    assert versions[CORE_DISTRIBUTION] == core.version
    assert {name: versions[name] for name in SLICER_PINS} == SLICER_PINS  # Slicer's packages untouched
    assert "onnxruntime" in versions and "torch" not in versions
    check = subprocess.run([str(slicerPython), "-c", "import sys, sam2unet_core.cli.predict, "
                            "sam2unet_core.inference.onnx_runner; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "False", check.stderr

    # An updated extension carrying another version: reported, and replaced on request.
    newer = layOutInstalledExtension(tmp_path / "newer" / "qt-scripted-modules")
    init = newer / BUNDLE_FOLDER / "sam2unet_core" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "99.0.0"', init.read_text(encoding="utf-8")),
                    encoding="utf-8")
    problem = coreVersionProblem(_venvVersions(slicerPython), findBundledCore(newer))
    assert problem.startswith(f"sam2unet_core {core.version} is installed, but this extension carries 99.0.0")
    asked, done, log = _install(slicerPython, newer, wheelhouse)
    assert done == [(True, "Installation finished")], log
    assert f"sam2unet_core 99.0.0 from this extension, replacing {core.version}" in asked[0]
    versions = _venvVersions(slicerPython)
    assert versions[CORE_DISTRIBUTION] == "99.0.0"
    assert {name: versions[name] for name in SLICER_PINS} == SLICER_PINS
    assert coreVersionProblem(versions, findBundledCore(newer)) is None


# Slicer's own macro, reduced to what it installs: the module's scripts and resources keep their
# relative paths under the scripted-modules folder. Everything else is the module's real
# CMakeLists.txt, the bundle's install rules included.
CMAKE_STAND_IN = """
cmake_minimum_required(VERSION 3.20)
project(LayoutCheck NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(BUILD_TESTING OFF)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(item ${MY_SCRIPTS} ${MY_RESOURCES})
    get_filename_component(folder ${item} DIRECTORY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${item}
            DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${folder} COMPONENT RuntimeLibraries)
  endforeach()
endmacro()
add_subdirectory(MODULE_DIR SAM2UNetSlicer)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_install_lays_the_extension_out_as_the_install_test_does(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(CMAKE_STAND_IN.replace("MODULE_DIR", MODULE_DIR.as_posix()),
                                            encoding="utf-8")
    for command in (["cmake", "-S", str(project), "-B", str(tmp_path / "build")],
                    ["cmake", "--install", str(tmp_path / "build"), "--prefix", str(tmp_path / "installed")]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    installed = tmp_path / "installed" / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    emulated = layOutInstalledExtension(tmp_path / "emulated")

    def files(root: Path) -> set[str]:
        return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}

    assert files(installed) == files(emulated)
    assert findBundledCore(installed).path == installed.resolve() / BUNDLE_FOLDER
    built = tmp_path / "build" / "lib" / "Slicer-5.10" / "qt-scripted-modules" / BUNDLE_FOLDER
    assert files(built) == files(installed / BUNDLE_FOLDER)  # the build tree carries it too
