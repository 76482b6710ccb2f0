"""The extension's entry for the 3D Slicer Extensions Index and the metadata the index checks.

The rules are those the index applies to a new entry (``scripts/check_description_files.py``
of github.com/Slicer/ExtensionsIndex): the description file validates against the catalog
entry schema (``Testing/data/slicer-extension-catalog-entry-schema-v1.0.2.json``, a copy of
``Schemas/`` in github.com/Slicer/Slicer, so nothing is downloaded here), its category is one
the index knows, ``scm_url`` is a git or https URL, the top-level ``CMakeLists.txt``'s
``project()`` is named as the description file, the icon and every screenshot are image URLs,
and a license file sits at the repository root. The URLs point into this repository, so the
files they name are checked here, and so is the homepage's anchor in the README.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = REPO / "SAM2UNetSlicer" / "ExtensionsIndex" / "SAM2UNet.json"
SCHEMA = Path(__file__).resolve().parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
RAW_PREFIX = "https://raw.githubusercontent.com/sam2unet/sam2unet_core/main/"
# Categories of the index that fit a segmentation extension (the index's list has about 60).
KNOWN_CATEGORIES = {"Segmentation", "Quantification", "Informatics", "Utilities"}
INDEX_EXTENSIONS = {"PyTorch"}  # extensions of the index this one builds on
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
MAX_SCREENSHOT_BYTES = 300_000


def _description() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


def _cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_variable(name: str) -> str:
    match = re.search(rf'set\s*\(\s*{name}\s+"([^"]*)"\s*\)', _cmake())
    assert match, f"{name} is not set in CMakeLists.txt"
    return match.group(1)


def _repository_file(url: str) -> Path:
    """The file of this repository that a raw.githubusercontent.com URL of main names."""
    assert url.startswith(RAW_PREFIX), f"{url} does not point into this repository's main branch"
    return REPO / urllib.parse.unquote(url[len(RAW_PREFIX):])


def _github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_description_validates_against_the_catalog_schema() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    description = _description()
    jsonschema.validate(description, schema)
    assert description["$schema"].split("#")[0] == schema["$id"].split("#")[0]


def test_schema_refuses_what_the_index_refuses() -> None:
    """The checked-in schema is strict: the check above can fail."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    for broken in ({**_description(), "scmurl": "https://example.org/x.git"},  # unknown key
                   {k: v for k, v in _description().items() if k != "scm_url"},
                   {**_description(), "tier": 7}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_category_is_known_to_the_index_and_matches_cmake() -> None:
    category = _description()["category"]
    assert category in KNOWN_CATEGORIES
    assert category == _cmake_variable("EXTENSION_CATEGORY")


def test_scm_url_is_a_git_or_https_url_of_this_repository() -> None:
    url = _description()["scm_url"]
    parts = urllib.parse.urlsplit(url)
    assert "://" in url and parts.scheme in ("git", "https")
    assert parts.path.removesuffix(".git").strip("/") == "sam2unet/sam2unet_core"


def test_repository_name_exception_is_requested_in_the_readme() -> None:
    """The index wants 'slicer' in the repository name; ours holds the library too, so the
    submission asks for an exception, and the README says so."""
    name = Path(urllib.parse.urlsplit(_description()["scm_url"]).path).stem
    if "slicer" not in name.lower():
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        assert re.search(r"exception", readme) and "Slicer" in readme
        assert "repository name" in readme


def test_cmake_project_is_named_as_the_description_file() -> None:
    match = re.search(r"project\s*\(\s*([^\s)]+)", _cmake(), re.IGNORECASE)
    assert match and match.group(1) == DESCRIPTION.stem


def test_build_dependencies_are_index_extensions_and_the_cmake_depends() -> None:
    dependencies = _description()["build_dependencies"]
    assert set(dependencies) <= INDEX_EXTENSIONS
    assert dependencies == _cmake_variable("EXTENSION_DEPENDS").split()


def test_icon_and_screenshots_exist_in_the_repository_as_images() -> None:
    icon = _repository_file(_cmake_variable("EXTENSION_ICONURL"))
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    screenshots = _cmake_variable("EXTENSION_SCREENSHOTURLS").split()
    assert screenshots
    for url in screenshots:
        assert url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))
        path = _repository_file(url)
        assert path.is_file(), f"{url}: {path} does not exist"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"
        assert len(data) < MAX_SCREENSHOT_BYTES


def test_homepage_anchor_is_a_readme_heading() -> None:
    homepage = _cmake_variable("EXTENSION_HOMEPAGE")
    assert homepage.startswith("https://github.com/sam2unet/sam2unet_core")
    anchor = urllib.parse.urlsplit(homepage).fragment
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    anchors = {_github_anchor(line.lstrip("#")) for line in readme.splitlines() if line.startswith("#")}
    assert anchor in anchors, f"#{anchor} is not a heading of README.md: {sorted(anchors)}"


def test_license_file_is_apache_2_as_setup_py_declares() -> None:
    found = [REPO / name for name in LICENSE_NAMES if (REPO / name).is_file()]
    assert found, "no license file at the repository root"
    text = found[0].read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert 'license="Apache-2.0"' in (REPO / "setup.py").read_text(encoding="utf-8")


def test_description_avoids_jargon_and_contributors_name_the_project() -> None:
    description = _cmake_variable("EXTENSION_DESCRIPTION")
    for jargon in ("Hiera", "adapter", "U-shaped", "CUDA/MPS", "checkpoint"):
        assert jargon not in description
    assert _cmake_variable("EXTENSION_CONTRIBUTORS") == "sam2unet_core project"
