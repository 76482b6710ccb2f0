"""Download size, install time and installed size of the two install routes, side by side:

* ``torch-free``: ``pip install "sam2unet_core[onnx]"`` (core + ONNX Runtime), what
  ``sam2unet-predict -m model.onnx`` and the Slicer module's ONNX route need.
* ``torch``: the torch CPU wheel, sam2 (``--no-deps``) and ``"sam2unet_core[torch]"``
  (core + torch, MONAI, training and export packages), as the Makefile installs them.

Each route goes into a fresh virtualenv under ``--scratch`` (no system site-packages).
The download size is what ``pip download`` saves for the route (the wheels and sdists, all
dependencies included); the install time is a fresh ``pip install`` from pip's warm cache
(so it counts unpacking and building, not the network), wall and process CPU time.

    python benchmarks/bench_install.py --scratch /tmp/bench_install

Needs the package index (pip's cache is used). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("setup.py", "MANIFEST.in", "README.md", "requirements.txt", "requirements-onnx.txt",
                "requirements-torch.txt", "requirements-dev.txt")
SAM2 = "sam2==1.1.0"


def copy_source(target: Path) -> Path:
    """The files ``pip install`` needs from the work tree, so the build leaves no build/ there."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, target / name)
    shutil.copytree(REPO / "sam2unet_core", target / "sam2unet_core", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def run(command: list[str], **env: str) -> tuple[float, float]:
    """Run ``command`` (check it succeeds); its wall and CPU seconds (children's user+sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def route_steps(route: str, source: Path, torch_version: str) -> list[list[str]]:
    """The pip argument lists that install ``route`` (each one ``pip install`` call)."""
    if route == "torch-free":
        return [[f"{source}[onnx]"]]
    return [["--upgrade", "pip", "setuptools", "wheel"], [f"torch=={torch_version}"],
            ["--no-deps", "--no-build-isolation", SAM2], [f"{source}[torch]"]]


def measure(route: str, scratch: Path, source: Path, torch_version: str) -> dict[str, float | int | str]:
    folder = scratch / route
    shutil.rmtree(folder, ignore_errors=True)
    downloads = folder / "downloads"
    pip_download = [sys.executable, "-m", "pip", "download", "-q", "--prefer-binary", "-d", str(downloads)]
    if route == "torch-free":
        run([*pip_download, f"{source}[onnx]"])
    else:  # one resolve for torch and the extra (as pip install sees them), sam2 on its own
        run([*pip_download, f"torch=={torch_version}", f"{source}[torch]"])
        run([*pip_download, "--no-deps", "--no-build-isolation", SAM2])  # its setup.py imports torch
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(folder / "venv")
    python = folder / "venv" / "bin" / "python"
    wall = cpu = 0.0
    for step in route_steps(route, source, torch_version):
        step_wall, step_cpu = run([str(python), "-m", "pip", "install", "-q", "--prefer-binary", *step],
                                  SAM2_BUILD_CUDA="0")
        wall, cpu = wall + step_wall, cpu + step_cpu
    site = next((folder / "venv" / "lib").glob("python*/site-packages"))
    return {"route": route, "download_MB": folder_bytes(downloads) / 1e6,
            "files": sum(1 for _ in downloads.iterdir()), "install_wall_s": wall, "install_cpu_s": cpu,
            "installed_MB": folder_bytes(site) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the venvs and downloads")
    parser.add_argument("--routes", nargs="+", default=["torch-free", "torch"], choices=["torch-free", "torch"])
    parser.add_argument("--torch-version", default="2.13.0", help="as the Makefile's TORCH_VERSION")
    args = parser.parse_args(argv)
    source = copy_source(args.scratch / "src")
    rows = [measure(route, args.scratch, source, args.torch_version) for route in args.routes]
    print(f"{'route':<12} {'download MB':>12} {'files':>6} {'install wall s':>15} {'install CPU s':>14} "
          f"{'installed MB':>13}")
    for row in rows:
        print(f"{row['route']:<12} {row['download_MB']:>12.1f} {row['files']:>6} {row['install_wall_s']:>15.1f} "
              f"{row['install_cpu_s']:>14.1f} {row['installed_MB']:>13.1f}")
    print(json.dumps({"routes": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
