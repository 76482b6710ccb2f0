"""What the panel shows about a checkpoint: read through ``sam2unet_core``, never re-parsed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["MetadataReader", "readCheckpointMetadata", "describeMetadata"]

MetadataReader = Callable[[Path], Any]  # path -> sam2unet_core.metadata.ModelMetadata


def readCheckpointMetadata(path: Path, reader: MetadataReader | None = None) -> Any:
    """The ``ModelMetadata`` of a checkpoint.

    ``reader`` defaults to ``sam2unet_core.checkpoint.read_metadata``; a missing
    ``sam2unet_core`` raises ``ModuleNotFoundError`` (the caller offers to install it).
    """
    if reader is None:
        from sam2unet_core.checkpoint import read_metadata as reader  # lazily: needs the dependencies
    if not Path(path).is_file():
        raise ValueError(f"model checkpoint {path} is not a file")
    try:
        return reader(Path(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the model metadata of {path}: {err}") from err


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
