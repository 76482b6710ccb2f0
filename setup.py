"""Install sam2unet_core.

torch and sam2 are installed by the Makefile first (see README): torch pinned to the CPU
or CUDA build you want, and sam2 with --no-deps because it declares torchvision, which
Hiera does not need. They are therefore not listed in install_requires.
"""

from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="sam2unet_core",
    version="0.1.0",
    description="SAM2-UNet segmentation for medical images and volumes, with a 3D Slicer module",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sam2unet_core", "sam2unet_core.*"]),
    package_data={"sam2unet_core": ["model/*.yaml", "configs/*.yaml", "export/*.json"]},
    install_requires=read_requirements("requirements.txt"),
    extras_require={"dev": read_requirements("requirements-dev.txt"),
                    "onnx": read_requirements("requirements-onnx.txt")},
    entry_points={
        "console_scripts": [
            "sam2unet-predict = sam2unet_core.cli.predict:main",
            "sam2unet-export = sam2unet_core.cli.export:main",
            "sam2unet-evaluate = sam2unet_core.cli.evaluate:main",
            "sam2unet-train = sam2unet_core.cli.train:main",
        ]
    },
)
