"""Static checks of the SAM2UNetSlicer extension: the .ui file, the CMake lists, the icon, the
Slicer API names the module uses, and that the logic package never imports Slicer."""

from __future__ import annotations

import ast
import enum
import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from slicer_fakes import MODULE_DIR

REPO = MODULE_DIR.parent
MODULE_FILE = MODULE_DIR / "SAM2UNetSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAM2UNetSlicer.ui"
LIB_DIR = MODULE_DIR / "SAM2UNetSlicerLib"

# slicer.util functions checked by hand against Slicer v5.10.0 Base/Python/slicer/util.py
# (and still present in v5.12.3); a new call must be checked the same way before it is added.
VERIFIED_SLICER_UTIL = {
    "loadUI", "childWidgetVariables", "tryWithErrorDisplay", "errorDisplay", "infoDisplay",
    "confirmOkCancelDisplay", "exportNode", "arrayFromVTKMatrix", "updateVolumeFromArray",
    "arrayFromVolume", "arrayFromSegmentBinaryLabelmap", "VTKObservationMixin", "getNodesByClass",
}

# Widget classes that Slicer's parameterNodeWrapper connects to each field type
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: exact type checks).
CONNECTABLE = {
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "enum": {"QComboBox", "ctkComboBox"},
}


def uiTree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def uiWidgets() -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in uiTree().iter("widget")}


def moduleAst() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def wrapperFields() -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    tree = moduleAst()
    source = MODULE_FILE.read_text(encoding="utf-8")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: ast.get_source_segment(source, item.annotation)
                    for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in SAM2UNetSlicer.py")


def typeKey(annotation: str) -> str:
    base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
    parameters = importlib.import_module("SAM2UNetSlicerLib.Parameters")
    if isinstance(getattr(parameters, base, None), type) and issubclass(getattr(parameters, base), enum.Enum):
        return "enum"
    return base


def parameterBindings() -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    bindings = {}
    for widget in uiTree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.find("string").text] = widget
    return bindings


# ---------------------------------------------------------------------------------- .ui
def test_ui_is_qt_designer_xml_with_a_qmrmlwidget_root() -> None:
    root = uiTree()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "SAM2UNetSlicer"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "SAM2UNetSlicer")
    names = [widget.get("name") for widget in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_log_and_advanced_start_collapsed_and_every_form_row_is_unique() -> None:
    root = uiTree()
    collapsed = {widget.get("name"): any(prop.get("name") == "collapsed" and prop.findtext("bool") == "true"
                                          for prop in widget.findall("property"))
                 for widget in root.iter("widget") if widget.get("class") == "ctkCollapsibleButton"}
    assert collapsed == {"inputsCollapsibleButton": False, "modelCollapsibleButton": False,
                         "trainCollapsibleButton": True, "logCollapsibleButton": True,
                         "advancedCollapsibleButton": True}
    for layout in root.iter("layout"):
        if layout.get("class") == "QFormLayout":
            cells = [(item.get("row"), item.get("column")) for item in layout.findall("item")]
            assert len(cells) == len(set(cells)), f"{layout.get('name')}: two widgets in one cell"


def test_every_widget_the_code_uses_is_in_the_ui() -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert {"segmentButton", "cancelButton", "progressBar", "logTextEdit", "timeLabel"} <= used
    missing = used - set(uiWidgets())
    assert not missing, f"SAM2UNetSlicer.py uses widgets missing from {UI_FILE.name}: {sorted(missing)}"


def test_every_parameter_is_bound_to_a_widget_that_can_show_it() -> None:
    fields = wrapperFields()
    bindings = parameterBindings()
    assert set(bindings) == set(fields)
    for name, annotation in fields.items():
        widgetClass = bindings[name].get("class")
        assert widgetClass in CONNECTABLE[typeKey(annotation)], f"{name}: {annotation} cannot bind to {widgetClass}"


def test_custom_widgets_are_declared_and_node_selectors_get_the_scene() -> None:
    root = uiTree()
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    used = {widget.get("class") for widget in root.iter("widget")}
    assert {cls for cls in used if not cls.startswith("Q")} <= declared
    for custom in root.iter("customwidget"):
        assert custom.findtext("header") == f"{custom.findtext('class')}.h"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {name for name, widget in uiWidgets().items() if widget.get("class") == "qMRMLNodeComboBox"}
    assert selectors == receivers == {"inputSelector", "outputSelector", "trainVolumeSelector",
                                      "trainSegmentationSelector"}


# ---------------------------------------------------------------------------------- CMake
def cmakeList(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "SAM2UNetSlicer") for item in match.group(1).split()]


def test_module_cmake_lists_every_script_and_resource() -> None:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "set(MODULE_NAME SAM2UNetSlicer)" in text
    scripts = sorted(cmakeList(text, "MODULE_PYTHON_SCRIPTS"))
    resources = sorted(cmakeList(text, "MODULE_PYTHON_RESOURCES"))
    onDiskScripts = sorted(str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py")
                           if "Testing" not in p.parts and "__pycache__" not in p.parts)
    onDiskResources = sorted(str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert scripts == onDiskScripts
    assert resources == onDiskResources
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s*WITH_GENERIC_TESTS\s*\)", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file() and (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_extension_cmake_has_the_metadata_and_depends_on_pytorch() -> None:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SAM2UNetSlicer)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)


def test_extension_cmake_accepts_the_cmake_versions_of_slicer_5_10_and_5_12() -> None:
    """Slicer v5.10.0 builds with CMake 3.20.6 or newer (its template says 3.20.6...3.22.6),
    v5.12 with 3.28 (template 3.28.0...3.28.0): the minimum must not exclude 5.10's CMake."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(r"cmake_minimum_required\(VERSION (\d+(?:\.\d+)*)(?:\.\.\.(\d+(?:\.\d+)*))? FATAL_ERROR\)", text)
    assert match, "cmake_minimum_required(VERSION min...max FATAL_ERROR) is missing"

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    assert version(match.group(1)) <= (3, 20, 6)
    assert match.group(2) is None or version(match.group(2)) >= (3, 28, 0)


def test_icon_is_a_128_pixel_png() -> None:
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "SAM2UNetSlicer.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        assert len(icon.convert("RGB").getcolors(maxcolors=128 * 128)) > 10  # a picture, not a flat square


# ---------------------------------------------------------------------------------- code
@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_logic_files_never_import_slicer_qt_or_vtk(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"slicer", "qt", "vtk", "ctk", "PythonQt"}


def test_module_file_imports_only_existing_library_names() -> None:
    for node in ast.walk(moduleAst()):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SAM2UNetSlicerLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_only_verified_slicer_util_functions_are_used() -> None:
    used = set()
    for path in [MODULE_FILE, *LIB_DIR.glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"slicer\.util\.(\w+)", text))
        used |= set(re.findall(r"_slicer\.util\.(\w+)", text))
    assert used - VERIFIED_SLICER_UTIL == set()
