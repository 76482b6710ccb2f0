"""Training configuration: dataclasses read from YAML, with ``section.key=value`` overrides.

Defaults are the paper's recipe (AdamW lr 1e-3, weight decay 5e-4, cosine to 1e-7 over
20 epochs, batch 12, 352 px, flips). Every field is documented next to its default; see
``training/configs/*.yaml`` for complete examples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sam2unet_core.metadata import PREPROCESSING_FIELDS, Architecture, ModelMetadata

__all__ = [
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "merge_sections",
    "read_recipe",
    "apply_overrides",
]


@dataclass
class DataConfig:
    kind: str = "polyp"  # "polyp": image/mask folders; "volume": nnU-Net/MSD dataset folder
    root: str = ""  # polyp: folder with images/ and masks/; volume: folder with dataset.json
    val_root: str = ""  # polyp: a separate validation folder (images/, masks/); "" = split off
    val_fraction: float = 0.1  # share of training cases held out for validation when no val_root;
    # 0: validate on the training cases themselves (a fit check: nothing is held out)
    val_cases: list[str] = field(default_factory=list)  # volume: explicit validation case names
    # The model's preprocessing (PREPROCESSING_FIELDS of ModelMetadata, same defaults, same
    # check, written into the checkpoint): input_size (square side, multiple of 32),
    # intensity, mean/std (after intensity), context_slices (volume: 2.5D, 2c+1 slices),
    # plane (volume: slice plane the model is trained on and predicts along).
    input_size: int = ModelMetadata.input_size
    intensity: dict[str, Any] = field(default_factory=lambda: ModelMetadata().intensity)
    mean: list[float] = field(default_factory=lambda: ModelMetadata().mean)
    std: list[float] = field(default_factory=lambda: ModelMetadata().std)
    context_slices: int = ModelMetadata.context_slices
    plane: str = ModelMetadata.plane
    # Volume: train on slices of several planes, e.g. [axial, coronal, sagittal] (the first is
    # the model's main plane and replaces `plane`); predictions then fuse them. [] = plane alone.
    # Every slice, of any plane, is resized to the square input as at inference, without
    # resampling: on an anisotropic volume (e.g. 0.7 x 0.7 x 2.5 mm) the coronal and sagittal
    # slices are stretched along the coarse axis alike in training and in prediction.
    planes: list[str] = field(default_factory=list)
    foreground_fraction: float = 0.5  # volume: share of samples drawn from foreground slices
    samples_per_epoch: int = 0  # volume: 0 = number of slices in the training cases
    cache: str = "memory"  # volume: "memory" (CacheDataset), "disk" (PersistentDataset), "none"
    cache_dir: str = ""  # disk cache folder; "" = <output>/cache
    num_workers: int = 2  # DataLoader worker processes

    def network_channels(self) -> int:
        """Input channels of the network: 3 for pictures and single slices (repeated on
        the RGB stem), 2c+1 for a 2.5D stack of ``context_slices`` c."""
        return 3 if self.kind != "volume" or self.context_slices == 0 else 2 * self.context_slices + 1

    def preprocessing(self) -> dict[str, Any]:
        """The ``PREPROCESSING_FIELDS`` as ModelMetadata keyword arguments (2D images have
        no context and are their own axial plane)."""
        values = {name: copy.deepcopy(getattr(self, name)) for name in PREPROCESSING_FIELDS}
        if self.kind != "volume":
            values.update(context_slices=0, plane="axial", planes=[])
        elif values["planes"]:
            values["plane"] = values["planes"][0]
            if len(values["planes"]) == 1:
                values["planes"] = []
        return values


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5  # per axis (the paper: horizontal and vertical flips)
    rotate_deg: float = 0.0  # random rotation in [-r, r] degrees; 0 = off
    scale_range: float = 0.0  # random zoom in [1 - s, 1 + s]; 0 = off
    intensity_prob: float = 0.0  # chance of random intensity scale/shift/contrast; 0 = off
    multiscale: list[float] = field(default_factory=list)  # e.g. [0.75, 1.0, 1.25]; [] = off
    # Train on random crop_size x crop_size windows of the augmented input_size samples
    # (a multiple of 32, < data.input_size; 0 = off); validation and inference see whole slices.
    crop_size: int = 0
    # Side the training samples are resized to before augmentation; 0 = data.input_size.
    # Below data.input_size, the model learns at a coarser scale than it predicts at, so its
    # output (a quarter of the input side) is finer at inference ("FixRes", Touvron et al.
    # 2019). A multiple of 32 unless crop_size is set; validation sees data.input_size.
    train_size: int = 0


@dataclass
class ModelConfig:
    backbone: str = "hiera_l"  # hiera_t, hiera_s, hiera_b+, hiera_l
    sam2_checkpoint: str = ""  # official SAM 2/2.1 checkpoint; "" = random init, train all
    # One of our .safetensors models to continue from (fine-tuning): its preprocessing, plane and
    # architecture are the defaults of the config, its weights the start; labels are matched by
    # name and new names become new output channels (sam2unet_core.train.init_from).
    init_from: str = ""
    label_names: list[str] = field(default_factory=list)  # polyp: names of labels 1..K-1
    # Standard codes per label name, e.g. {"liver": {"category": ["SCT", "123037004", "Anatomical Structure"],
    # "type": ["SCT", "10200004", "Liver"]}} (optional "modifier"); names in sam2unet_core.terminology need none.
    label_terms: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # Display colour (RGB 0-255) per label name, e.g. {"liver": [221, 130, 101]}; others get the
    # base model's colour (model.init_from) or the default palette.
    label_colors: dict[str, list[int]] = field(default_factory=dict)
    # Stochastic depth in training: Hiera block i skips its residual branches with probability
    # drop_path_rate * i / (blocks - 1) (SAM 2's rule); no effect on the trained model's output.
    drop_path_rate: float = 0.0
    # Attention window side per Hiera stage in tokens, [] = SAM 2's ([8, 4, 14, 7] for hiera_t).
    # From scratch only: SAM 2's weights were trained with SAM 2's windows. The first side
    # cannot change (it sizes a position embedding).
    window_spec: list[int] = field(default_factory=list)
    # 0: the paper's head (logits at stride 4, up-sampled). c > 0: a full-resolution head of
    # width c (a two-conv stem on the input fused with the decoder), for training from scratch
    # at low resolution: the logits can then follow boundaries finer than 4 input pixels.
    full_res_channels: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 5e-4
    min_lr: float = 1e-7  # cosine schedule end
    epochs: int = 20
    batch_size: int = 12  # per process
    warmup_steps: int = 0  # linear learning-rate warm-up over the first N steps (0 = off)
    schedule: str = "epochs"  # cosine over optim.epochs (per epoch), or "budget": over the time box (per step)
    aux_loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # deep supervision: aux1, aux2


@dataclass
class RunConfig:
    output: str = "runs/sam2unet"  # checkpoints, resume state, TensorBoard logs
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    amp: str = "auto"  # auto: bf16 autocast on CUDA; "bf16"; "off"
    resume_every_steps: int = 0  # also save resume state every N steps (0 = off)
    resume_every_minutes: float = 5.0  # ... and every N minutes within an epoch (0 = off)
    stop_after_steps: int = 0  # stop as if killed after N steps in this run (0 = off)
    max_minutes: float = 0.0  # time box: end the epoch early, validate, save and stop (0 = off)
    max_cpu_minutes: float = 0.0  # the same box in CPU time of the training process, all runs of it (0 = off)
    max_steps: int = 0  # the same box in optimiser steps, all runs of it (0 = off); the first limit reached ends it
    val_batch_size: int = 16
    log_every_steps: int = 10  # TensorBoard scalars


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        if self.data.kind not in ("polyp", "volume"):
            raise ValueError(f"data.kind must be 'polyp' or 'volume', got {self.data.kind!r}")
        if not self.data.root:
            raise ValueError("data.root is not set: give the dataset folder")
        try:
            ModelMetadata(**self.data.preprocessing()).validate_preprocessing()
        except ValueError as err:
            raise ValueError(f"data.{err}") from err
        if self.data.cache not in ("memory", "disk", "none"):
            raise ValueError(f"data.cache must be memory, disk or none, got {self.data.cache!r}")
        if not 0.0 <= self.data.foreground_fraction <= 1.0:
            raise ValueError(f"data.foreground_fraction must be in [0, 1], got {self.data.foreground_fraction}")
        crop, train_size = self.augment.crop_size, self.augment.train_size
        train_side = train_size or self.data.input_size
        if crop and (crop % 32 or not 0 < crop < train_side):
            raise ValueError(f"augment.crop_size must be a multiple of 32 below the training side "
                             f"(augment.train_size or data.input_size: {train_side}), or 0; got {crop}")
        if train_size < 0 or (train_size and not crop and train_size % 32):
            raise ValueError(f"augment.train_size must be 0 (data.input_size) or, without augment.crop_size, "
                             f"a multiple of 32; got {train_size}")
        if not 0.0 <= self.model.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.model.drop_path_rate}")
        if self.model.init_from and self.model.sam2_checkpoint:
            raise ValueError("model.init_from and model.sam2_checkpoint are both set: a model to continue from "
                             "already holds its encoder's weights; give one of them")
        for name, color in self.model.label_colors.items():
            if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
                raise ValueError(f"model.label_colors[{name!r}] must be three integers 0-255, got {color}")
        if self.model.window_spec and self.model.sam2_checkpoint:
            raise ValueError(f"model.window_spec {self.model.window_spec} is for training from scratch: "
                             f"SAM 2's weights were trained with SAM 2's windows; leave it empty with "
                             f"model.sam2_checkpoint")
        try:
            Architecture(self.model.backbone, window_spec=self.model.window_spec,
                         full_res_channels=self.model.full_res_channels).validate()
        except ValueError as err:
            raise ValueError(f"model.{err}") from err
        if self.run.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"run.amp must be auto, bf16 or off, got {self.run.amp!r}")
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise ValueError(f"optim.epochs and optim.batch_size must be >= 1, got {self.optim}")
        if self.optim.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if self.optim.schedule not in ("epochs", "budget"):
            raise ValueError(f"optim.schedule must be epochs or budget, got {self.optim.schedule!r}")
        if self.run.max_steps < 0:
            raise ValueError(f"run.max_steps must be >= 0, got {self.run.max_steps}")
        if self.optim.schedule == "budget" and not (self.run.max_cpu_minutes or self.run.max_minutes or self.run.max_steps):
            raise ValueError("optim.schedule=budget needs a time box: set run.max_cpu_minutes, run.max_minutes "
                             "or run.max_steps")
        if len(self.optim.aux_loss_weights) != 2 or min(self.optim.aux_loss_weights) < 0:
            raise ValueError(f"optim.aux_loss_weights must be two weights >= 0 (aux1, aux2), "
                             f"got {self.optim.aux_loss_weights}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}{k}' for k in unknown]}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config section {where}{name} must be a mapping, got {value!r}")
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` overrides (values parsed as YAML) in a nested dict."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(text)
    return data


def merge_sections(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the sections of ``top`` laid over it key by key."""
    merged = copy.deepcopy(base)
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


RECIPES = Path(__file__).with_name("recipes")  # packaged recipes: <name>.yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def read_recipe(name: str) -> dict[str, Any]:
    """The sections of the packaged recipe ``name`` (``recipes/<name>.yaml``)."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"extends: no packaged recipe named {name!r}; recipes: {known}")
    return _read_yaml(path)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None), apply the
    overrides, validate and return it.

    Layers, each over the one before: the defaults; with ``model.init_from``, the base
    model's settings (:func:`.init_from.settings_of_model`); the packaged recipe the file
    names with a top-level ``extends: <name>`` (:func:`read_recipe`); the file; the overrides.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        recipe = data.pop("extends", None)
        if recipe is not None:
            data = merge_sections(read_recipe(str(recipe)), data)
    data = apply_overrides(data, overrides or [])
    init_from = (data.get("model") or {}).get("init_from")
    if init_from:  # the base model's settings, under those the config sets
        from .init_from import read_init_metadata, settings_of_model

        data = merge_sections(settings_of_model(read_init_metadata(init_from)), data)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated config from sections of keys (missing keys: the defaults)."""
    config = _from_dict(TrainConfig, data, "")
    config.validate()
    return config
