"""Install sam2unet_core.

install_requires (requirements.txt) is the torch-free core: image I/O, the batch layer,
statistics. Extras:
    * ``onnx`` (requirements-onnx.txt): ONNX Runtime, for ``sam2unet-predict -m model.onnx``
      without torch.
    * ``torch`` (requirements-torch.txt): torch, MONAI and the training/export packages.
      sam2 is not in it: install it with --no-deps (it declares torchvision, which Hiera
      does not need), after torch's CPU or CUDA build (the Makefile and README do this).
    * ``dev`` (requirements-dev.txt): the test suite and the demo.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name: str) -> list[str]:
    """The requirement lines of ``name``, without comments (whole-line or trailing)."""
    lines = Path(__file__).with_name(name).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def read_version() -> str:
    """``__version__`` of ``sam2unet_core/__init__.py``: the one place the version is written
    (the 3D Slicer module reads it there too, from the copy the extension carries)."""
    text = Path(__file__).with_name("sam2unet_core").joinpath("__init__.py").read_text(encoding="utf-8")
    return re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE).group(1)


setup(
    name="sam2unet_core",
    version=read_version(),
    description="SAM2-UNet segmentation for medical images and volumes, with a 3D Slicer module",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sam2unet_core", "sam2unet_core.*"]),
    package_data={"sam2unet_core": ["model/*.yaml", "train/recipes/*.yaml", "export/*.json"]},
    install_requires=read_requirements("requirements.txt"),
    extras_require={"onnx": read_requirements("requirements-onnx.txt"),
                    "torch": read_requirements("requirements-torch.txt"),
                    "dev": read_requirements("requirements-dev.txt")},
    entry_points={
        "console_scripts": [
            "sam2unet-predict = sam2unet_core.cli.predict:main",
            "sam2unet-export = sam2unet_core.cli.export:main",
            "sam2unet-evaluate = sam2unet_core.cli.evaluate:main",
            "sam2unet-train = sam2unet_core.cli.train:main",
        ]
    },
)
