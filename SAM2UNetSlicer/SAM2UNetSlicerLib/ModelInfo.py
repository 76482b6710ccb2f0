"""What the panel shows about a checkpoint, read without torch in Slicer's own process.

* ``.safetensors`` (ours): the metadata JSON is in the file header, read directly
  (``sam2unet_core.metadata.read_safetensors_metadata``: a few kilobytes, no torch).
* ``.pt``/``.pth`` (official SAM2-UNet, SAM 2; up to about 900 MB): reading them needs
  ``torch.load``, so a child process describes them (``python -m sam2unet_core.cli.describe``,
  one JSON line) through a ``ProcessRunnerProtocol``; the GUI thread never loads them.
* ``.onnx`` (``sam2unet-export``): the metadata sits in the model's properties, after the
  weights (ONNX Runtime reads the whole file: about 1 s for a 120 MB hiera_t on a shared
  CPU), so the same child process describes it, with ONNX Runtime and without torch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "MetadataReader",
    "HEADER_SUFFIXES",
    "readCheckpointMetadata",
    "describeCommand",
    "parseDescribeOutput",
    "CheckpointDescriber",
    "describeMetadata",
    "PICTURE_MODEL_REASON",
    "modelProblem",
]

MetadataReader = Callable[[Path], Any]  # path -> ModelMetadata, or None: "ask the child process"
HEADER_SUFFIXES = (".safetensors",)  # metadata readable from the header, without torch
CHILD_MODULES = {".onnx": ("sam2unet_core", "onnxruntime")}  # what describing needs; others: sam2unet_core


def readHeaderMetadata(path: Path) -> Any:
    """The ``ModelMetadata`` of a ``.safetensors`` checkpoint from its header; None for other
    formats (they need the child process). A missing ``sam2unet_core`` (or, for ``.onnx``,
    ``onnxruntime``) raises ImportError."""
    suffix = path.suffix.lower()
    if suffix not in HEADER_SUFFIXES:
        for module in CHILD_MODULES.get(suffix, ("sam2unet_core",)):
            if importlib.util.find_spec(module) is None:  # the child could not describe it either
                raise ModuleNotFoundError(f"{module} is not installed in Slicer's Python", name=module)
        return None
    from sam2unet_core.metadata import read_safetensors_metadata  # torch-free

    return read_safetensors_metadata(path)


def readCheckpointMetadata(path: Path, reader: MetadataReader | None = None) -> Any:
    """The ``ModelMetadata`` of a checkpoint, or None when only a child process can read it
    (``.pt``/``.pth``/``.onnx``: see :class:`CheckpointDescriber`). Returns within milliseconds.

    ``reader`` defaults to the header reader; a missing ``sam2unet_core`` raises
    ``ModuleNotFoundError`` (the caller offers to install it). Unreadable: ``ValueError``.
    """
    reader = reader or readHeaderMetadata
    if not Path(path).is_file():
        raise ValueError(f"model checkpoint {path} is not a file")
    try:
        return reader(Path(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the model metadata of {path}: {err}") from err


def describeCommand(python: str, path: Path) -> list[str]:
    """Command line that prints the checkpoint's metadata JSON on one line (in the child)."""
    return [python, "-m", "sam2unet_core.cli.describe", str(path)]


def parseDescribeOutput(lines: list[str], path: Path, returnCode: int) -> Any:
    """The ``ModelMetadata`` from the describe command's output; ``ValueError`` naming the
    checkpoint and the child's last message otherwise."""
    from sam2unet_core.metadata import ModelMetadata

    if returnCode == 0:
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    return ModelMetadata.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"cannot read the model metadata of {path}: {err}") from err
    detail = next((line for line in reversed(lines) if line.strip()), f"exit code {returnCode}")
    raise ValueError(f"cannot read the model metadata of {path}: {detail}")


class CheckpointDescriber:
    """Describes ``.pt``/``.pth``/``.onnx`` models in a child process on ``runner``.

    ``describe`` returns at once; ``onDone(metadata, errorText)`` is called from the runner's
    ``poll()`` (the main thread). A newer ``describe`` cancels the older one.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def describe(self, python: str, path: Path, env: dict[str, str] | None,
                 onDone: Callable[[Any, str | None], None]) -> None:
        self.runner.cancel()
        lines: list[str] = []

        def finished(returnCode: int) -> None:
            try:
                onDone(parseDescribeOutput(lines, path, returnCode), None)
            except ValueError as err:
                onDone(None, str(err))

        self.runner.start(describeCommand(python, path), env, lines.append, finished)

    def cancel(self) -> None:
        self.runner.cancel()


def describeMetadata(metadata: Any) -> str:
    """One short paragraph for the panel: classes, input size, backbone, channels."""
    arch = metadata.architecture
    names = ", ".join(label.name for label in metadata.labels)
    kind = "binary" if arch.num_classes == 1 else f"{arch.num_classes - 1} classes + background"
    context = f", 2.5D with {2 * metadata.context_slices + 1} slices" if metadata.context_slices else ""
    return (
        f"Classes ({kind}): {names}\n"
        f"Input size: {metadata.input_size} x {metadata.input_size} px, "
        f"{arch.in_channels} channel(s){context}\n"
        f"Backbone: {arch.backbone}"
    )


PICTURE_MODEL_REASON = (
    "This model cannot segment a CT or MR volume: it was trained on colour pictures (red, green "
    "and blue channels, such as endoscopy frames), and a volume has one grey channel. Choose a "
    "model trained on volumes."
)


def modelProblem(metadata: Any, allowUntrained: bool = False) -> str | None:
    """Why the model of ``metadata`` cannot segment a scalar volume, or None when it can.

    A model of colour pictures (official SAM2-UNet polyp weights) never fits a scalar volume;
    a SAM 2 checkpoint (untrained decoder) is refused unless ``allowUntrained``. Metadata of
    an older ``sam2unet_core`` without these properties counts as usable.
    """
    if getattr(metadata, "trained_on_pictures", False):
        return PICTURE_MODEL_REASON
    if not getattr(metadata, "decoder_trained", True) and not allowUntrained:
        return (metadata.untrained_reason() + ". To run it anyway for a smoke test, tick "
                "Advanced > Allow an untrained model.")
    return None
