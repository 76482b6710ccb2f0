"""Which backend segments with a model file, and the :class:`Predictor` over it.

:func:`load_predictor` is the library call behind ``sam2unet-predict -m MODEL``: an ``.onnx``
file runs on ONNX Runtime (no torch); a checkpoint (``.safetensors``, official ``.pth``) runs
on the backend ``backend`` names:

* ``torch``: PyTorch at ``precision`` (:mod:`sam2unet_core.inference.acceleration`).
* ``onnxruntime``: ONNX Runtime, fp32, on an export of the checkpoint made once and cached
  (:mod:`sam2unet_core.export.cache`); CPU, or CUDA with ``onnxruntime-gpu``.
* ``auto`` (default): :func:`choose_backend`. On a CPU where torch would run plain fp32
  (no native bf16, or ``precision fp32``), ONNX Runtime fp32: the same fp32 model, faster in
  ``benchmarks/bench_onnx.py`` on every CPU measured so far (AVX2: 1.24x torch fp32, labels
  equal). On a CPU with native bf16 (AVX512_BF16/AMX) at ``precision auto``, torch with bf16
  Hiera stages 3-4 (measured faster than ONNX Runtime fp32 there, label Dice >= 0.999). On
  CUDA, MPS, at ``precision bf16/fp16``, or without onnxruntime and onnx installed: torch.
  If the cache folder cannot be written, ``auto`` warns and runs torch.

The choice and its reason are logged and end the runner's ``description`` (the run
summary's ``device``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ..errors import OptionError
from ..metadata import UntrainedModelError, file_kind, read_metadata
from .engine import Predictor
from .onnx_runner import OnnxRunner  # numpy only; onnxruntime on first use

__all__ = ["BACKENDS", "BackendChoice", "choose_backend", "load_predictor"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
_ONNX_PRECISIONS = ("auto", "fp32")  # an fp32 export runs at fp32


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs a checkpoint (``torch`` or ``onnxruntime``) and why."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} backend: {self.reason}"


def choose_backend(requested: str, device_type: str, precision: str, native_bf16: bool,
                   onnx_installed: bool) -> BackendChoice:
    """The backend ``requested`` (one of ``BACKENDS``) means for a checkpoint on a device of
    ``device_type`` (``cpu``, ``cuda``, ``mps``) at ``precision``; see the module docstring.
    ``native_bf16``: the CPU has native bf16 (``acceleration.cpu_has_native_bf16``);
    ``onnx_installed``: onnxruntime and onnx can be imported. ``ValueError`` for an unknown
    backend, or ``onnxruntime`` with a precision, device or installation it cannot run."""
    _check_backend(requested)
    if requested == "torch":
        return BackendChoice("torch", "asked")
    if requested == "onnxruntime":
        if precision not in _ONNX_PRECISIONS:
            raise OptionError(f"backend onnxruntime runs an fp32 export; precision {precision!r} needs "
                              f"backend torch", "precision", precision)
        if device_type not in ("cpu", "cuda"):
            raise OptionError(f"backend onnxruntime runs on cpu or cuda, not {device_type}", "device", device_type)
        if not onnx_installed:
            raise OptionError("backend onnxruntime needs the onnxruntime and onnx packages", "backend", requested)
        return BackendChoice("onnxruntime", "asked")
    if device_type != "cpu":
        return BackendChoice("torch", f"auto on {device_type}")
    if precision not in _ONNX_PRECISIONS:
        return BackendChoice("torch", f"auto, precision {precision} asked")
    if precision == "auto" and native_bf16:
        return BackendChoice("torch", "auto: CPU with native bf16, bf16 Hiera stages 3-4 in torch")
    if not onnx_installed:
        return BackendChoice("torch", "auto: onnxruntime or onnx not installed")
    why = "fp32 asked" if precision == "fp32" else "CPU without native bf16"
    return BackendChoice("onnxruntime", f"auto: {why}, ONNX Runtime fp32 runs it faster than torch fp32")


def _check_backend(requested: str) -> None:
    if requested not in BACKENDS:
        raise OptionError(f"backend {requested!r} is not one of {BACKENDS}", "backend", requested)


def _onnx_installed() -> bool:
    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def load_predictor(model_path: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
                   backend: str = "auto", batch_size: int = 8, allow_untrained: bool = False,
                   cache_folder: Path | None = None, native_bf16: bool | None = None) -> Predictor:
    """A :class:`Predictor` for the model file ``model_path`` on ``device``.

    Args:
        model_path: ``.onnx`` from ``sam2unet-export`` (ONNX Runtime, torch is not imported),
            or a checkpoint (``.safetensors``, official ``.pth``).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (checkpoints; an ONNX file runs
            at the precision it was written with).
        backend: ``auto``, ``torch`` or ``onnxruntime`` (checkpoints; see the module docstring).
        cache_folder: where exports are cached (default ``export.cache.cache_dir()``).
        native_bf16: whether the CPU has native bf16 (None: ask it); tests pass it to
            exercise both ``auto`` rules on any CPU.
    Raises ``ValueError``/``OSError`` for a bad file, device, precision or backend, and
    ``metadata.UntrainedModelError`` for an untrained model without ``allow_untrained``.
    """
    model_path = Path(model_path)
    _check_backend(backend)  # also for an .onnx file, which never reaches choose_backend
    if file_kind(model_path) == "onnx":
        if precision != "auto":
            raise OptionError(f"precision {precision}: an ONNX file runs at the precision it was written "
                              f"with (fp32, or int8 when quantised)", "precision", precision)
        if backend == "torch":
            raise OptionError("backend torch: an ONNX file runs on ONNX Runtime; pass the checkpoint it "
                              "was exported from", "backend", backend)
        return Predictor(OnnxRunner(model_path, device=device), batch_size=batch_size,
                         allow_untrained=allow_untrained)
    from ..device import resolve_device  # torch from here on
    from .acceleration import cpu_has_native_bf16

    resolved = resolve_device(device)
    native_bf16 = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    choice = choose_backend(backend, resolved.type, precision, native_bf16, _onnx_installed())
    if choice.name == "onnxruntime":
        metadata = read_metadata(model_path)  # an untrained model is refused before any export
        if not metadata.decoder_trained and not allow_untrained:
            raise UntrainedModelError(metadata.untrained_reason())
        try:
            runner = _cached_onnx_runner(model_path, resolved.type, cache_folder, choice)
        except OSError as err:
            if backend != "auto":
                raise
            choice = BackendChoice("torch", f"auto: the ONNX export cannot be cached ({err})")
            logger.warning("%s: %s", model_path, choice.reason)
        else:
            logger.info("%s: %s", model_path, choice.describe())
            return Predictor(runner, batch_size=batch_size, allow_untrained=allow_untrained)
    from ..checkpoint import load_model
    from .torch_runner import TorchRunner

    logger.info("%s: %s", model_path, choice.describe())
    runner = TorchRunner(load_model(model_path), device=resolved, precision=precision, note=choice.describe(),
                         native_bf16=native_bf16)
    return Predictor(runner, batch_size=batch_size, allow_untrained=allow_untrained)


def _cached_onnx_runner(model_path: Path, device_type: str, folder: Path | None,
                        choice: BackendChoice) -> OnnxRunner:
    """An ``OnnxRunner`` on the cached export of ``model_path``, exporting it first when it
    is missing, and again (with a warning) when the cached file cannot be read."""
    from ..export.cache import cached_export_path, export_to_cache

    target = cached_export_path(model_path, folder)
    note = f"{choice.describe()}; export cached as {target}"
    if not target.is_file():
        export_to_cache(model_path, target)
        return OnnxRunner(target, device=device_type, note=note)
    try:
        return OnnxRunner(target, device=device_type, note=note)
    except ValueError as err:
        logger.warning("%s: the cached ONNX export %s cannot be used (%s); exporting it again",
                       model_path, target, err)
        export_to_cache(model_path, target)
        return OnnxRunner(target, device=device_type, note=note)
