"""Export a SAM2-UNet as a MONAI Bundle.

:func:`export_bundle` writes the folder that ``python -m monai.bundle run`` (MONAI Label,
MONAI Deploy, the Auto3DSeg Slicer extension) loads::

    bundle_dir/
        configs/metadata.json   MONAI's bundle metadata (meta_schema_20240725): versions,
                                task, network_data_format (inputs/outputs, label names)
        configs/inference.json  the Model Zoo's config ids: bundle_root, dataset_dir,
                                output_dir, device, network_def, network, datalist,
                                preprocessing, dataset, dataloader, inferer, postprocessing,
                                handlers (CheckpointLoader), evaluator, initialize, run, finalize
        configs/logging.conf    console logging for the run
        models/model.pt         ``torch.save(model.state_dict())``, as the Model Zoo does
        docs/README.md          inputs, outputs, labels, the command

The network is rebuilt from ``network_def`` (``SAM2UNet`` with the architecture of the
``sam2unet_metadata`` entry, our :class:`~sam2unet_core.metadata.ModelMetadata`) and filled
from ``models/model.pt`` by MONAI's ``CheckpointLoader``. What the bundle runs besides MONAI
(its datalist and the ``SliceInferer`` around our ``Predictor``) lives in the small, stable
module :mod:`sam2unet_core.inference.monai_bundle`, which ``inference.json`` names by dotted
path; this module only writes bundles (and still provides those two names, which bundles
exported before that module existed refer to here).

``configs/metadata.json`` is checked against MONAI's metadata schema before the folder
appears; the schema ships with this package (:data:`SCHEMA_PATH`, see :data:`SCHEMA_URL`)
so ``python -m monai.bundle verify_metadata --filepath SCHEMA_PATH`` runs offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.monai_bundle import NIFTI_ENDINGS, SliceInferer, list_nifti_files  # old bundles name them here
from ..io.atomic import partial_path
from ..io.volume import model_label_dtype
from ..metadata import ModelMetadata
from ..model.sam2unet import SAM2UNet

__all__ = ["BUNDLE_VERSION", "SCHEMA_URL", "SCHEMA_PATH", "SCHEMA_MD5", "NIFTI_ENDINGS", "SliceInferer",
           "export_bundle", "verify_metadata", "list_nifti_files", "inference_config", "bundle_metadata"]

BUNDLE_VERSION = "0.1.0"
# MONAI's bundle metadata schema; SCHEMA_PATH is this file, taken verbatim from the copy in
# github.com/Project-MONAI/project-monai.github.io (public/schema/meta_schema_20240725.json),
# which states it was copied verbatim from the MONAI-extra-test-data 0.8.1 release.
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
SCHEMA_PATH = Path(__file__).with_name("monai_meta_schema_20240725.json")
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # of SCHEMA_PATH: verify_metadata checks it
METADATA_ID = "sam2unet_metadata"  # the inference.json entry holding our ModelMetadata
CONFIG_SPECIAL_STARTS = ("$", "@", "%")  # strings MONAI's ConfigParser would evaluate
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


# ----------------------------------------------------------------- run-time pieces
# --------------------------------------------------------------------- the configs
def inference_config(metadata: ModelMetadata, batch_size: int = 8) -> dict[str, Any]:
    """``configs/inference.json``: the Model Zoo's ids; ``--dataset_dir IN --output_dir
    OUT`` (and any other id) can be overridden on the ``monai.bundle run`` command line."""
    architecture = f"@{METADATA_ID}#architecture#"
    metadata_dict = metadata.to_dict()
    network_arguments = list(metadata_dict["architecture"])  # the fields the metadata writes
    output_dtype = f"$numpy.{model_label_dtype(metadata.architecture.num_classes)}"
    return {
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        METADATA_ID: metadata_dict,
        "network_def": {
            "_target_": f"{SAM2UNet.__module__}.SAM2UNet",
            **{name: architecture + name for name in network_arguments},
        },
        "network": "$@network_def.to(@device)",
        "datalist": {"_target_": f"{list_nifti_files.__module__}.list_nifti_files", "folder": "@dataset_dir"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                # nibabel's voxel order and affine, no reorientation or resampling
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": f"{SliceInferer.__module__}.SliceInferer", "metadata": f"@{METADATA_ID}",
                    "batch_size": batch_size},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                 "output_postfix": "@output_postfix", "output_ext": ".nii.gz",
                 "output_dtype": output_dtype, "resample": False, "separate_folder": False,
                 "writer": "NibabelWriter", "print_log": False},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      # SliceInferer's runner does its own autocast (as sam2unet-predict)
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],  # nothing to seed: inference is deterministic
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def bundle_metadata(metadata: ModelMetadata, source_name: str, authors: str, copyright: str) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's bundle metadata format (:data:`SCHEMA_URL`)."""
    import monai

    arch = metadata.architecture
    side = metadata.input_size
    context = metadata.context_slices  # a grey slice repeated on every channel when 0
    offsets = range(-context, context + 1) if context else [0] * arch.in_channels
    input_channels = {str(c): f"slice {o:+d}" if o else "the slice" for c, o in enumerate(offsets)}
    names = {label.value: label.name for label in metadata.labels}
    label_values = {"0": "background", **{str(value): name for value, name in names.items()}}
    if arch.num_classes == 1:
        output_channels = {"0": names[1]}
        output_text = f"1 channel of logits, sigmoid > 0.5 is {names[1]}"
    else:
        output_channels = label_values
        output_text = f"{arch.num_classes} channels of logits (softmax), the argmax is the label value"
    intensity = metadata.intensity
    hounsfield = intensity["kind"] == "ct_window"
    normalised = "then mean/std" if metadata.mean else "no mean/std"
    context_text = (f"with {context} neighbouring slice(s) on each side as channels (2.5D)"
                    if context else "one slice at a time")
    labels_text = ", ".join(f"{value} is {name}" for value, name in label_values.items())
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by sam2unet-export from {source_name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "sam2unet_core": _package_version("sam2unet_core"),
            "nibabel": _package_version("nibabel"),
            "pytorch-ignite": _package_version("pytorch-ignite"),
        },
        "name": f"SAM2-UNet {arch.backbone} ({', '.join(metadata.class_names)})",
        "task": f"Segmentation of {', '.join(metadata.class_names)} in 3D volumes, slice by slice "
                f"along the {metadata.plane} plane",
        "description": (
            f"A 2D SAM2-UNet ({arch.backbone} Hiera encoder) run over every {metadata.plane} slice "
            f"of a NIfTI volume, {context_text}. Each slice: intensity mapping {json.dumps(intensity)} (per volume), "
            f"resize to {side}x{side}, {normalised}; the labels are resized back to the input "
            "grid and written with the input's affine. Runs sam2unet_core's inference engine, "
            "so the label maps equal those of sam2unet-predict."
        ),
        "authors": authors,
        "copyright": copyright,
        "data_type": "nibabel",
        "image_classes": "single channel 3D volume (CT in Hounsfield units)" if hounsfield
                         else "single channel 3D volume (raw intensities)",
        "pred_classes": f"one label map, voxel values: {labels_text}",
        "intended_use": "Research; not for clinical diagnosis",
        "labels": [label.to_dict() for label in metadata.labels],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if hounsfield else "magnitude",
                    "num_channels": arch.in_channels,
                    "spatial_shape": [side, side],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": input_channels,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": arch.num_classes,
                    "spatial_shape": [side, side],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": output_channels,
                    "description": output_text,
                }
            },
            "post_processed_outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": str(model_label_dtype(arch.num_classes)),
                    "value_range": [0, max(arch.num_classes - 1, 1)],
                    "is_patch_data": False,
                    "channel_def": label_values,
                }
            },
        },
    }


def _readme(metadata: ModelMetadata, meta: dict[str, Any]) -> str:
    """``docs/README.md``: what goes in, what comes out, the labels, the commands."""
    rows = "\n".join(f"| {label.value} | {label.name} | {tuple(label.color)} |" for label in metadata.labels)
    return f"""# {meta['name']}

{meta['description']}

Exported by `sam2unet-export MODEL --format monai-bundle` (sam2unet_core
{meta['required_packages_version']['sam2unet_core']}, MONAI {meta['monai_version']}).

## Input
NIfTI volumes (`.nii`, `.nii.gz`, one 3D image a file) in `dataset_dir`, read with nibabel as
stored (no reorientation or resampling). Slices are cut along the **{metadata.plane}** plane,
found from the affine whatever the voxel order.

## Output
One label map a case, `OUTPUT_DIR/<name>_seg.nii.gz` ({meta['network_data_format']['post_processed_outputs']['pred']['dtype']}),
on the input's voxel grid with its affine. Label values:

| value | name | colour (RGB) |
|---|---|---|
| 0 | background | |
{rows}

## Run
```bash
python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
    --bundle_root BUNDLE --dataset_dir IN --output_dir OUT
```
Needs `sam2unet_core` (and `pytorch-ignite`, `fire`) next to MONAI. Any config id can be
overridden the same way, e.g. `--inferer#batch_size 4`, `--inferer#tta true`,
`--device "\\$torch.device('cpu')"`.

Check the metadata (offline, with the schema that ships with sam2unet_core):
```bash
python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json \\
    --filepath "$(python -c 'from sam2unet_core.export.bundle import SCHEMA_PATH; print(SCHEMA_PATH)')"
```

## Files
- `configs/inference.json`: the inference workflow (`{METADATA_ID}` holds the model's labels
  and preprocessing; `network_def` rebuilds the network from its architecture).
- `configs/metadata.json`: MONAI bundle metadata.
- `models/model.pt`: the network's state dict.

{meta['intended_use']}.
"""


# ----------------------------------------------------------------------- writing
def _check_config_safe(value: Any, where: str) -> None:
    """MONAI's ConfigParser evaluates strings that start with ``$``, ``@`` or ``%``; the
    metadata copied into inference.json must hold none (``ValueError`` names the field)."""
    if isinstance(value, str) and value.startswith(CONFIG_SPECIAL_STARTS):
        raise ValueError(f"metadata field {where} = {value!r} starts with {value[0]!r}, which MONAI's "
                         "config parser would evaluate; rename it before exporting a bundle")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_config_safe(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_config_safe(item, f"{where}[{index}]")


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")


def export_bundle(model: SAM2UNet, path: str | os.PathLike, source_name: str = "a checkpoint",
                  authors: str = "not stated", copyright: str = "not stated", batch_size: int = 8) -> Path:
    """Write ``model`` (its ``metadata`` included) as a MONAI Bundle folder at ``path``.

    The bundle is written into a temporary sibling folder (``io.atomic.partial_path``),
    its metadata verified against MONAI's schema, then renamed to ``path``: a failure
    leaves no folder behind. An existing non-empty ``path`` is refused (``FileExistsError``).
    ``source_name`` goes into the changelog; ``authors``/``copyright`` into the metadata.
    """
    path = Path(path)
    metadata = model.metadata
    if metadata is None:
        raise ValueError("the model has no metadata (a bare SAM2UNet): load it with "
                         "sam2unet_core.load_model or build it with sam2unet_core.build_model")
    metadata.validate()
    _check_config_safe(metadata.to_dict(), METADATA_ID)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not an empty folder; choose a new bundle folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        for folder in ("configs", "models", "docs"):
            (temporary / folder).mkdir(parents=True)
        meta = bundle_metadata(metadata, source_name, authors, copyright)
        _write_json(temporary / "configs" / "metadata.json", meta)
        _write_json(temporary / "configs" / "inference.json", inference_config(metadata, batch_size))
        (temporary / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
        torch.save(state, temporary / "models" / "model.pt")
        (temporary / "docs" / "README.md").write_text(_readme(metadata, meta), encoding="utf-8")
        verify_metadata(temporary / "configs" / "metadata.json")
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return path


def verify_metadata(meta_file: str | os.PathLike) -> None:
    """Check a bundle's ``metadata.json`` against MONAI's metadata schema shipped with this
    package (:data:`SCHEMA_PATH`, its MD5 checked first) with ``jsonschema``, the check of
    ``monai.bundle verify_metadata``, offline and without logging; ``ValueError`` says what
    fails."""
    import jsonschema

    schema = SCHEMA_PATH.read_bytes()
    if hashlib.md5(schema, usedforsecurity=False).hexdigest() != SCHEMA_MD5:
        raise ValueError(f"{SCHEMA_PATH}: not MONAI's metadata schema (its MD5 is not {SCHEMA_MD5})")
    metadata = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    try:
        jsonschema.validate(instance=metadata, schema=json.loads(schema))
    except jsonschema.ValidationError as err:
        where = "/".join(str(key) for key in err.absolute_path) or "the top level"
        raise ValueError(f"{meta_file}: {err.message} (at {where}), against MONAI's metadata schema "
                         f"{SCHEMA_URL}") from err
