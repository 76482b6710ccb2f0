"""ONNX exports of checkpoint files, made once and kept in a per-user cache folder.

``sam2unet-predict --backend auto`` runs a ``.safetensors`` (or official ``.pth``) model on
the CPU through ONNX Runtime where that is the faster correct path
(:mod:`sam2unet_core.inference.backend`). The export it needs is written here, not next to
the model (which may be read-only or shared):

    $SAM2UNET_CACHE_DIR/onnx/       when that variable is set, else
    $XDG_CACHE_HOME/sam2unet/onnx/  else ~/.cache/sam2unet/onnx/

A cached file is named ``<model file stem>-<key>.onnx``; the key is a SHA-256 over the model
file's bytes and the versions that shape the export (sam2unet_core, torch, onnx, onnxruntime,
the opset), so a changed model file or an upgraded exporter gets a new export, and an
unchanged one is reused. Files are written atomically (``io.atomic``). Deleting the folder
clears the cache (exports of old versions are not removed otherwise). Importing this module
costs no torch; exporting imports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from importlib import metadata as package_metadata
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "cache_key", "cached_export_path", "export_to_cache"]

logger = logging.getLogger(__name__)

CACHE_ENV = "SAM2UNET_CACHE_DIR"  # overrides the cache folder (its onnx/ subfolder holds the exports)
_EXPORT_PACKAGES = ("torch", "onnx", "onnxruntime")  # their versions are part of the key
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The folder of cached ONNX exports (see the module docstring); not created here."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sam2unet" / "onnx"


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return "absent"


def cache_key(model_path: str | os.PathLike) -> str:
    """24 hex digits of SHA-256 over the bytes of ``model_path`` and the versions of
    sam2unet_core, torch, onnx, onnxruntime and the export's opset."""
    from .. import __version__
    from .onnx import MIN_OPSET

    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    versions = [f"sam2unet_core={__version__}", f"opset={MIN_OPSET}",
                *(f"{name}={_version(name)}" for name in _EXPORT_PACKAGES)]
    digest.update("\n".join(versions).encode())
    return digest.hexdigest()[:24]


def cached_export_path(model_path: str | os.PathLike, folder: Path | None = None) -> Path:
    """Where the export of ``model_path`` is (or will be) cached, in ``folder`` (default
    :func:`cache_dir`)."""
    model_path = Path(model_path)
    return (folder or cache_dir()) / f"{model_path.stem}-{cache_key(model_path)}.onnx"


def export_to_cache(model_path: str | os.PathLike, target: Path) -> Path:
    """Load the checkpoint ``model_path`` and write its ONNX export at ``target`` (from
    :func:`cached_export_path`), atomically, creating the folder. ``OSError`` when the
    folder cannot be written; loading errors as ``checkpoint.load_model`` raises them."""
    from ..checkpoint import load_model  # torch from here on
    from .onnx import export_onnx

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(load_model(model_path), target)
    logger.info("%s: exported to ONNX in %.1f s, cached as %s (reused while the file and the "
                "package versions stay the same)", model_path, time.perf_counter() - started, target)
    return target
