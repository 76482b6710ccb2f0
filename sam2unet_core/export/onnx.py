"""Export a SAM2-UNet to an ONNX file that holds the whole per-slice model step and its
metadata, so ONNX Runtime alone (no torch) segments with it.

The exported graph (opset >= 17) maps intensity-mapped slices to probabilities::

    slices         float32 (B, C, H, W)   raw slices after ``preprocessing.apply_intensity``
    probabilities  float32 (B, N, H, W)   sigmoid (N = 1) or softmax (N = num_classes)

Batch, height and width are dynamic. Inside the graph: bilinear resize to the model's
``input_size`` (``preprocessing.resize_batch``), per-channel mean/std
(``preprocessing.normalize_channels``), the network, sigmoid/softmax and the bilinear
resize back to ``(H, W)``. Outside (numpy, shared with the torch runner, in
``sam2unet_core.preprocessing``): the per-volume intensity mapping, 2.5D slice stacking,
test-time flips and the label rule.

The model's :class:`~sam2unet_core.metadata.ModelMetadata` JSON is stored in the file's
``metadata_props`` under the key ``sam2unet`` (the key of our safetensors header).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import atomic_write
from ..metadata import ModelMetadata
from ..model.sam2unet import SAM2UNet
from ..preprocessing import normalize_channels, resize_batch

__all__ = ["METADATA_KEY", "INPUT_NAME", "OUTPUT_NAME", "MIN_OPSET", "SlicePipeline", "export_onnx"]

METADATA_KEY = "sam2unet"  # same key as the safetensors header
INPUT_NAME = "slices"
OUTPUT_NAME = "probabilities"
MIN_OPSET = 17


class SlicePipeline(nn.Module):
    """The per-slice model step that goes into the ONNX graph: intensity-mapped slices
    ``(B, C, H, W)`` -> probabilities ``(B, N, H, W)`` (see the module docstring)."""

    def __init__(self, model: SAM2UNet) -> None:
        super().__init__()
        self.model = model
        self.metadata = model.metadata

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        meta = self.metadata
        size = slices.shape[-2:]
        # always resize (no shortcut when the sizes match) so the traced graph stays dynamic
        batch = nn.functional.interpolate(slices, size=(meta.input_size, meta.input_size),
                                          mode="bilinear", align_corners=False)
        logits = self.model(normalize_channels(batch, meta.mean, meta.std))
        probabilities = torch.sigmoid(logits) if meta.architecture.num_classes == 1 else logits.softmax(1)
        return nn.functional.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)


def _example_input(metadata: ModelMetadata) -> torch.Tensor:
    """A traced example whose sides differ from ``input_size`` (so both resizes are
    recorded) and from each other (so height and width stay separate dimensions)."""
    side = metadata.input_size
    return torch.rand(2, metadata.architecture.in_channels, side + 11, side + 5,
                      generator=torch.Generator().manual_seed(0))


def _embed_metadata(onnx_path: Path, metadata: ModelMetadata) -> None:
    """Write our metadata into ``metadata_props`` of the ONNX file (in place) and check it."""
    import onnx

    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())
    proto.producer_name = "sam2unet_core"
    proto.doc_string = (f"SAM2-UNet {metadata.architecture.backbone}, labels "
                        f"{', '.join(metadata.class_names)}; see metadata_props['{METADATA_KEY}']")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(onnx_path))


def export_onnx(model: SAM2UNet, path: str | os.PathLike, opset: int = MIN_OPSET) -> Path:
    """Write ``model`` (its ``metadata`` included) as an ONNX file at ``path``, atomically.

    The graph is :class:`SlicePipeline` with dynamic batch, height and width; ``opset``
    must be >= 17. Runs on the CPU in fp32; the model is left in eval mode on the CPU.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    metadata = model.metadata
    metadata.validate()
    pipeline = SlicePipeline(model.float().cpu().eval()).eval()
    example = _example_input(metadata)
    dynamic = {0: "batch", 2: "height", 3: "width"}

    def write(tmp: Path) -> None:
        with torch.no_grad():
            # The TorchScript-based exporter: Hiera's window padding traces to static
            # shapes at input_size, the resizes around it to dynamic ones.
            torch.onnx.export(pipeline, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic})
        _embed_metadata(tmp, metadata)

    return atomic_write(Path(path), write)
