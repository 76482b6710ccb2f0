"""What to train, as data: the request that ``sam2unet-train --request`` reads and
:func:`sam2unet_core.train.from_pairs.train_from_pairs` carries out.

Torch-free, so that the 3D Slicer module (whose process never imports torch) writes its
requests with the same code the trainer reads them with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .io.orientation import check_planes
from .metadata import LabelInfo

__all__ = ["BASES", "TrainingPair", "TrainingRequest"]

BASES = ("scratch", "sam2", "model")  # from scratch (Hiera-T), a SAM 2 checkpoint, one of our models


@dataclass(frozen=True)
class TrainingPair:
    """A scalar volume and its label map (0 background, 1..K the request's label values) on
    the same voxel grid; ``name`` identifies the pair in messages and the model's provenance."""

    image: Path
    label: Path
    name: str

    def __post_init__(self) -> None:  # strings accepted
        object.__setattr__(self, "image", Path(self.image))
        object.__setattr__(self, "label", Path(self.label))


@dataclass
class TrainingRequest:
    """The pairs, the labels (values 1..K in order; names, colours, codes), where the model
    goes (``.safetensors``), the base (``scratch``: Hiera-T from random weights; ``sam2``: a
    SAM 2/2.1 checkpoint at ``base_path``, its trunk frozen; ``model``: one of our models at
    ``base_path`` to fine-tune), the plane, the device and the seed. ``minutes`` is the
    wall-clock budget of the training itself (reading the volumes and the final validation
    come on top)."""

    pairs: list[TrainingPair]
    labels: list[LabelInfo]
    output: Path
    base: str = "scratch"
    base_path: str = ""
    plane: str = "axial"
    minutes: float = 10.0
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:  # strings accepted
        self.output = Path(self.output)

    def validate(self) -> None:
        """``ValueError`` naming the first bad field."""
        if not self.pairs:
            raise ValueError("pairs: no training pairs given")
        names = [pair.name for pair in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pairs: names must differ, got {names}")
        values = [label.value for label in self.labels]
        if values != list(range(1, len(values) + 1)):
            raise ValueError(f"labels: values must be 1..K in order, got {values}")
        label_names = [label.name for label in self.labels]
        if len(set(label_names)) != len(label_names) or not all(label_names):
            raise ValueError(f"labels: names must be non-empty and differ, got {label_names}")
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.base != "scratch" and not Path(self.base_path).is_file():
            raise ValueError(f"base_path: {self.base_path or '(empty)'}: file not found (needed for base {self.base!r})")
        check_planes([self.plane])
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if Path(self.output).suffix != ".safetensors":
            raise ValueError(f"output: {self.output}: a model file ends in .safetensors")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["pairs"] = [{"image": str(p.image), "label": str(p.label), "name": p.name} for p in self.pairs]
        data["labels"] = [label.to_dict() for label in self.labels]
        data["output"] = str(self.output)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainingRequest":
        """Read :meth:`to_json`'s form; ``ValueError`` naming what is missing or malformed."""
        try:
            data = json.loads(text)
            pairs = [TrainingPair(Path(p["image"]), Path(p["label"]), str(p["name"])) for p in data.pop("pairs")]
            labels = [LabelInfo.from_dict(item) for item in data.pop("labels")]
            output = Path(data.pop("output"))
            unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(pairs=pairs, labels=labels, output=output, **data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a training request: {err!r}") from err
