"""Model metadata: everything besides the weights that is needed to rebuild a model and
prepare its input.

The metadata travels as JSON inside our safetensors checkpoints (header key ``sam2unet``),
so one file rebuilds the network (``architecture``), its input preparation
(``preprocessing``, ``input_size``), the anatomical ``plane`` its 2D slices are cut along
and the meaning of its outputs (``labels``). :func:`read_safetensors_metadata` reads it
from the file's JSON header with the standard library only (no torch).

Format versions: 1 had no ``plane`` (such files read as ``axial``, the plane every model
was then run on); 2 adds it; 3 adds ``planes``, the planes of a model trained on several
(multi-planar). A file is written with the lowest version that holds its fields, so
one-plane models stay readable by version-2 readers.

Label convention:
    * ``num_classes == 1``: one sigmoid channel; voxels with p > 0.5 get label value 1.
    * ``num_classes == K > 1``: K softmax channels, channel 0 is background; the argmax
      is the label value, so ``labels`` describes values 1..K-1.

Preprocessing (applied per 2D slice or image, in this order):
    1. ``intensity``: maps raw values to about [0, 1]. One of
       ``{"kind": "ct_window", "center": 40, "width": 400}`` (HU window, clipped),
       ``{"kind": "percentile", "lower": 0.5, "upper": 99.5}`` (per volume, clipped),
       ``{"kind": "zscore"}`` (per volume mean/std, then not clipped),
       ``{"kind": "scale", "divisor": 255}`` (8-bit images such as endoscopy frames).
    2. ``mean``/``std``: per-channel normalisation after step 1 (ImageNet for the polyp
       models); empty lists mean none.
    3. ``context_slices`` c: the model sees 2c+1 neighbouring slices as channels (2.5D).
       A grey model with ``in_channels == 3`` and c == 0 gets the slice repeated 3 times.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UnsupportedModelError

__all__ = [
    "FILE_KINDS",
    "file_kind",
    "Architecture",
    "Code",
    "LabelInfo",
    "ModelMetadata",
    "INTENSITY_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "PLANES",
    "CheckpointError",
    "read_metadata",
    "UntrainedModelError",
    "read_safetensors_metadata",
    "PREPROCESSING_FIELDS",
]

FORMAT_VERSION = 3  # 2: adds ``plane``; 3: adds ``planes``
METADATA_KEY = "sam2unet"  # the safetensors header entry holding the metadata JSON
PLANES = ("axial", "coronal", "sagittal")  # see sam2unet_core.io.orientation
# the fields that say how a slice is prepared; the training config holds these same fields
PREPROCESSING_FIELDS = ("input_size", "intensity", "mean", "std", "context_slices", "plane", "planes")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on its JSON header
BACKBONES = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")
INTENSITY_KINDS = {
    "ct_window": ("center", "width"),
    "percentile": ("lower", "upper"),
    "zscore": (),
    "scale": ("divisor",),
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Colours for labels without one (RGB 0-255): distinct, readable on grey images.
DEFAULT_COLORS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]


class CheckpointError(UnsupportedModelError):
    """A checkpoint file that cannot be used; the message names the file and the cause."""


class UntrainedModelError(UnsupportedModelError):
    """A model whose decoder was never trained (a SAM 2 checkpoint read as a model) was given
    for segmentation without explicitly allowing it."""


# checkpoint file ending -> kind (torch-free, so CLIs choose the backend without torch)
FILE_KINDS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".onnx": "onnx"}


def file_kind(path: str | os.PathLike) -> str:
    """The ``FILE_KINDS`` entry of ``path``'s ending; other endings (``.bin``, ``.ckpt``)
    are tried as torch files, whose content then decides. ``CheckpointError`` for a missing
    file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return FILE_KINDS.get(path.suffix.lower(), "torch")


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters that rebuild the network; see ``sam2unet_core.SAM2UNet``. Frozen: a
    model and its metadata may hold the same one; a change makes a new one
    (``dataclasses.replace``)."""

    backbone: str = "hiera_l"
    num_classes: int = 1
    in_channels: int = 3
    freeze_encoder: bool = True  # frozen Hiera trunk + trainable adapters (the paper)
    # Attention window side per Hiera stage, in tokens; () = SAM 2's for the backbone.
    window_spec: tuple[int, ...] = ()
    # Width of the full-resolution head; 0 = the paper's head (logits at stride 4).
    full_res_channels: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_spec", tuple(self.window_spec))  # lists from JSON, configs

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not one of {BACKBONES}")
        if self.window_spec and (len(self.window_spec) != 4 or min(self.window_spec) < 1):
            raise ValueError(f"window_spec must be empty or four window sides >= 1 (one per Hiera "
                             f"stage), got {self.window_spec}")
        if self.window_spec and any(side % 2 for side in self.window_spec[:3]):
            raise ValueError(f"window_spec {self.window_spec}: the sides of stages 1-3 must be even (the "
                             f"first block of the next stage halves them when it pools)")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.full_res_channels < 0:
            raise ValueError(f"full_res_channels must be 0 (the paper's head) or >= 1, got {self.full_res_channels}")


@dataclass(frozen=True)
class Code:
    """A coded concept as DICOM writes it: coding scheme designator (``"SCT"`` for SNOMED CT),
    code value and code meaning, e.g. ``Code("SCT", "10200004", "Liver")``."""

    scheme: str
    value: str
    meaning: str

    def to_list(self) -> list[str]:
        return [self.scheme, self.value, self.meaning]

    @classmethod
    def from_list(cls, item: Any, where: str) -> "Code":
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and all(isinstance(x, str) and x for x in item)):
            raise ValueError(f"{where} must be [scheme, value, meaning] (three non-empty strings), got {item!r}")
        return cls(*item)


CODED_FIELDS = ("category", "type", "modifier")  # DICOM CID 7150, CID 7151, laterality modifier


@dataclass(frozen=True)
class LabelInfo:
    """One output label value with its display name, RGB colour (0-255) and, optionally, its
    standard terminology: segmented property ``category`` (DICOM CID 7150), ``type`` (CID 7151)
    and type ``modifier`` (e.g. laterality), SNOMED CT codes. ``sam2unet_core.terminology``
    fills missing codes from the name (in a new ``LabelInfo``: frozen)."""

    value: int
    name: str
    color: tuple[int, int, int]
    category: Code | None = None
    type: Code | None = None
    modifier: Code | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"value": self.value, "name": self.name, "color": list(self.color)}
        for key in CODED_FIELDS:
            code = getattr(self, key)
            if code is not None:
                data[key] = code.to_list()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelInfo":
        """Read a label written by :meth:`to_dict`; files without codes load as before."""
        name = str(data["name"])
        codes = {key: Code.from_list(data[key], f"label {name!r} {key}") for key in CODED_FIELDS if key in data}
        return cls(int(data["value"]), name, tuple(int(c) for c in data["color"]), **codes)


@dataclass(frozen=True)
class ModelMetadata:
    """All that a checkpoint says besides its weights. See the module docstring.

    Frozen: a model, its runners and a saved copy may hold the same object, so nobody can
    change it under the others; a change makes a new one (``dataclasses.replace``). Its
    lists and dicts are read, never written, by this package."""

    architecture: Architecture = field(default_factory=Architecture)
    labels: list[LabelInfo] = field(default_factory=list)
    input_size: int = 352  # square side in pixels the slices are resized to
    intensity: dict[str, Any] = field(default_factory=lambda: {"kind": "scale", "divisor": 255.0})
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    context_slices: int = 0
    plane: str = "axial"  # anatomical plane of the 2D slices the model was trained on
    # Several planes when trained on all of them (first == plane); [] = plane alone.
    planes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.labels:
            object.__setattr__(self, "labels", default_labels(self.architecture.num_classes))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        self.architecture.validate()
        self.validate_preprocessing()
        arch = self.architecture
        expected_values = list(range(1, max(arch.num_classes, 2)))
        values = [label.value for label in self.labels]
        if values != expected_values:
            raise ValueError(
                f"labels must describe values {expected_values} for num_classes="
                f"{arch.num_classes}, got {values}"
            )
        if len(self.mean) != len(self.std) or len(self.mean) not in (0, arch.in_channels):
            raise ValueError(
                f"mean/std must be empty or have in_channels={arch.in_channels} entries, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        stack = 2 * self.context_slices + 1
        if arch.in_channels != stack and not (arch.in_channels == 3 and stack == 1):
            raise ValueError(
                f"in_channels={arch.in_channels} does not fit context_slices="
                f"{self.context_slices} (expects {stack} channels, or 3 for a repeated slice)"
            )

    def validate_preprocessing(self) -> None:
        """Check the fields of ``PREPROCESSING_FIELDS`` that do not depend on the network
        (the training config uses this same check); ``ValueError`` names the field."""
        if self.input_size % 32 != 0 or self.input_size <= 0:
            raise ValueError(f"input_size must be a positive multiple of 32, got {self.input_size}")
        kind = self.intensity.get("kind")
        if kind not in INTENSITY_KINDS:
            raise ValueError(f"intensity kind {kind!r} is not one of {sorted(INTENSITY_KINDS)}")
        missing = [key for key in INTENSITY_KINDS[kind] if key not in self.intensity]
        if missing:
            raise ValueError(f"intensity {kind!r} needs {missing}, got {self.intensity}")
        if self.context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {self.context_slices}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std must have as many entries, got {len(self.mean)} and {len(self.std)}")
        if self.plane not in PLANES:
            raise ValueError(f"plane {self.plane!r} is not one of {PLANES}")
        if self.planes and (len(self.planes) < 2 or len(set(self.planes)) != len(self.planes)
                            or any(p not in PLANES for p in self.planes) or self.planes[0] != self.plane):
            raise ValueError(f"planes {self.planes} must be two or three distinct planes of "
                             f"{PLANES}, the first being plane {self.plane!r}")

    @property
    def trained_planes(self) -> tuple[str, ...]:
        """Every plane the model was trained on, its main ``plane`` first."""
        return tuple(self.planes) or (self.plane,)

    @property
    def class_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def decoder_trained(self) -> bool:
        """False for an official SAM 2 / SAM 2.1 checkpoint read as a model: its Hiera trunk
        is a base for training and its decoder holds random weights."""
        return self.provenance.get("source") != "sam2"

    def untrained_reason(self) -> str:
        """Why a model with ``decoder_trained`` False cannot segment, and what to do."""
        name = self.provenance.get("file") or "this checkpoint"
        return (f"{name} is a SAM 2 checkpoint: its Hiera trunk is a base for training and its "
                f"decoder is untrained, so it cannot segment. Train or fine-tune a SAM2-UNet on it "
                f"first (sam2unet-train with model.sam2_checkpoint set to this file) and use the "
                f"model that training writes")

    @property
    def trained_on_pictures(self) -> bool:
        """True for a model of colour pictures (PNG/JPG frames such as endoscopy): the official
        SAM2-UNet polyp weights, or a model trained with a picture (``polyp``) dataset. Its three
        input channels are red, green and blue, which a grey CT or MR volume cannot supply."""
        if self.provenance.get("source") == "official_sam2unet":
            return True
        config = self.provenance.get("config")
        data = config.get("data") if isinstance(config, dict) else None
        return isinstance(data, dict) and data.get("kind") == "polyp"

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = [label.to_dict() for label in self.labels]
        # Options left at the paper's values are not written: files that older versions read.
        for option in ("window_spec", "full_res_channels"):
            if not data["architecture"][option]:
                del data["architecture"][option]
        if not data["planes"]:  # one plane: a version-2 file
            del data["planes"]
            data["format_version"] = min(data["format_version"], 2)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMetadata":
        data = copy.deepcopy(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"metadata format_version {version} is newer than this sam2unet_core "
                f"understands ({FORMAT_VERSION}); upgrade sam2unet_core"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown metadata fields {unknown}; known: {sorted(known)}")
        arch = Architecture(**data.pop("architecture", {}))
        labels = [LabelInfo.from_dict(lab) for lab in data.pop("labels", [])]
        meta = cls(architecture=arch, labels=labels, **data)  # version 1: plane "axial"
        meta.validate()
        return meta

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        return cls.from_dict(json.loads(text))


def default_labels(
    num_classes: int, names: list[str] | None = None, terms: dict[str, dict[str, Any]] | None = None
) -> list[LabelInfo]:
    """Labels 1..K-1 (or 1 for a binary model) named ``names`` or ``label_<v>``.

    Codes come from ``terms`` (name -> ``{"category": [scheme, value, meaning], "type": ...,
    "modifier": ...}``, the training config's ``model.label_terms``); other labels store none
    and get theirs from ``sam2unet_core.terminology.label_codes`` (the name table) when written.
    """

    values = list(range(1, max(num_classes, 2)))
    if names is not None and len(names) != len(values):
        raise ValueError(f"{len(values)} label names expected, got {len(names)}: {names}")
    terms = dict(terms or {})
    labels = []
    for i, v in enumerate(values):
        name = names[i] if names else f"label_{v}"
        color = DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
        term = terms.pop(name, None)
        if term is not None:
            unknown = sorted(set(term) - set(CODED_FIELDS))
            if unknown or "type" not in term or "category" not in term:
                raise ValueError(f"label_terms[{name!r}] needs category and type (optional modifier), got keys {sorted(term)}")
            codes = {key: Code.from_list(term[key], f"label_terms[{name!r}].{key}") for key in term}
        else:
            codes = {}
        labels.append(LabelInfo(value=v, name=name, color=color, **codes))
    if terms:
        raise ValueError(f"label_terms name labels that do not exist: {sorted(terms)}; labels are {[lab.name for lab in labels]}")
    return labels


def read_safetensors_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The :class:`ModelMetadata` of one of our ``.safetensors`` checkpoints, read from the
    file's header without loading weights or importing torch.

    A safetensors file starts with an 8-byte little-endian header length, then that many
    bytes of JSON whose ``__metadata__`` maps strings to strings; ours holds the metadata
    JSON under ``METADATA_KEY``. Raises :class:`CheckpointError` naming the file and what
    is wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            start = fh.read(8)
            if len(start) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", start)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {length} bytes is over "
                    f"the format's limit of {MAX_HEADER_BYTES})")
            raw = fh.read(length)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {err.strerror or err}") from err
    if len(raw) < length:
        raise CheckpointError(f"{path}: truncated safetensors header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (bad JSON header: {err})") from err
    entries = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(entries, dict) or METADATA_KEY not in entries:
        raise CheckpointError(
            f"{path}: safetensors file without '{METADATA_KEY}' metadata; was it written "
            f"by sam2unet_core.save_model?"
        )
    try:
        return ModelMetadata.from_json(entries[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: invalid model metadata: {err}") from err


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """The metadata of any checkpoint without loading its weights: our ``.safetensors``
    files (header only) and ONNX files (ONNX Runtime) without torch; torch files (official
    SAM2-UNet, SAM 2) through ``sam2unet_core.checkpoint.read_torch_metadata``, which imports
    torch. Raises :class:`CheckpointError` naming the file."""
    kind = file_kind(path)
    if kind == "safetensors":
        return read_safetensors_metadata(path)
    if kind == "onnx":
        from .onnx_file import read_onnx_metadata  # onnxruntime, no torch

        return read_onnx_metadata(path)
    from .checkpoint import read_torch_metadata  # torch

    return read_torch_metadata(path)
