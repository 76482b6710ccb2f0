"""What an exported MONAI Bundle runs: the pieces its ``configs/inference.json`` names by
dotted path (``sam2unet_core.inference.monai_bundle.list_nifti_files`` and ``.SliceInferer``).

Every bundle written refers to these names, so they are kept stable: renaming or moving
one breaks the bundles already exported. (Bundles written before this module existed name
``sam2unet_core.export.bundle``, which still provides both.) The code that writes bundles
is ``sam2unet_core.export.bundle``.

MONAI reads each NIfTI file (``LoadImaged``, nibabel, no reorientation or resampling) and
writes each label map (``SaveImaged``, the input's affine); in between, :class:`SliceInferer`
runs our own :class:`~sam2unet_core.inference.engine.Predictor` over a ``TorchRunner``: the
same plane slicing, 2.5D stacks, per-volume intensity mapping, resize, mean/std and label
rule as ``sam2unet-predict``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import ImageMetaKey, MetaKeys

from ..device import PRECISIONS
from ..io.volume import LPS_TO_RAS, Volume, geometry_from_affine_ras
from ..metadata import ModelMetadata
from .engine import Predictor
from .torch_runner import TorchRunner

__all__ = ["NIFTI_ENDINGS", "SliceInferer", "list_nifti_files"]

NIFTI_ENDINGS = (".nii", ".nii.gz")


def list_nifti_files(folder: str | os.PathLike) -> list[str]:
    """The ``.nii``/``.nii.gz`` files directly in ``folder``, sorted (the bundle's
    ``datalist``); ``ValueError`` naming the folder when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: dataset_dir is not a folder")
    found = sorted(str(path) for path in folder.iterdir()
                   if path.is_file() and path.name.lower().endswith(NIFTI_ENDINGS))
    if not found:
        raise ValueError(f"{folder}: no NIfTI files (.nii, .nii.gz) in dataset_dir")
    return found


class SliceInferer(Inferer):
    """MONAI inferer that segments whole volumes with our :class:`Predictor`.

    ``inputs``: a batch from ``LoadImaged`` + ``EnsureChannelFirstd``, a ``MetaTensor``
    ``(B, 1, I, J, K)`` (nibabel's voxel order) whose ``affine`` maps ``(i, j, k)`` to RAS
    mm (LPS when its meta says ``space: LPS``). ``network``: a ``SAM2UNet`` of the
    metadata's architecture. Returns the label maps as a ``MetaTensor`` ``(B, 1, I, J, K)``
    (uint8, or int32 past 255 labels) carrying the inputs' meta, so ``SaveImaged`` writes
    them on the input's grid with its affine.

    Args:
        metadata: :class:`ModelMetadata` or its dict (``to_dict``): labels, preprocessing,
            the plane the slices are cut along.
        batch_size: slices per forward pass.
        tta, postprocess: as in :meth:`Predictor.predict`.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``, as ``sam2unet-predict --precision``.

    Each call segments with a runner built for it around its own inference copy of
    ``network`` (``inference.acceleration.prepare_model``), so the network is not changed
    and a network trained between calls is used with its current weights.
    """

    def __init__(self, metadata: ModelMetadata | dict[str, Any], batch_size: int = 8, tta: bool = False,
                 postprocess: Sequence[str] = (), precision: str = "auto") -> None:
        super().__init__()
        self.metadata = metadata if isinstance(metadata, ModelMetadata) else ModelMetadata.from_dict(metadata)
        self.metadata.validate()
        self.batch_size = batch_size
        self.tta = tta
        self.postprocess = tuple(postprocess)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        self.precision = precision

    def _predictor_for(self, network: torch.nn.Module) -> Predictor:
        """A Predictor over an inference copy of ``network`` (the network is not changed)."""
        architecture = getattr(network, "architecture", None)
        if architecture != self.metadata.architecture:
            raise ValueError(f"the network's architecture {architecture} differs from the "
                             f"metadata's {self.metadata.architecture}")
        device = next(network.parameters()).device
        runner = TorchRunner(network, metadata=self.metadata, device=device, precision=self.precision)
        return Predictor(runner, batch_size=self.batch_size)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> MetaTensor:
        """Segment each volume of ``inputs`` (see the class docstring); ``args``/``kwargs``
        of MONAI's inferer call are not used (the Predictor calls the network)."""
        if not isinstance(inputs, MetaTensor):
            raise ValueError("SliceInferer needs a MetaTensor with the image's affine (LoadImaged)")
        names = _batch_values(inputs, ImageMetaKey.FILENAME_OR_OBJ)
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"{names[0]}: expected one 3D image a case, (B, 1, I, J, K) after "
                             f"EnsureChannelFirstd; got shape {tuple(inputs.shape)} (a 4D image or "
                             "several channels: split it into 3D files)")
        predictor = self._predictor_for(network)
        spaces = _batch_values(inputs, MetaKeys.SPACE)
        affines = inputs.affine.reshape(-1, 4, 4).cpu().numpy()
        label_maps = []
        for index in range(inputs.shape[0]):
            array_ijk = inputs[index, 0].as_tensor().cpu().numpy()
            affine = affines[index]
            affine_ras = LPS_TO_RAS @ affine if str(spaces[index]).upper() == "LPS" else affine
            volume = Volume(array_ijk.transpose(2, 1, 0), *geometry_from_affine_ras(affine_ras),
                            source=Path(str(names[index])))
            prediction = predictor.predict(volume, tta=self.tta, postprocess=self.postprocess)
            label_maps.append(prediction.labels.array_kji.transpose(2, 1, 0))  # (I, J, K)
        # torch has no uint16 arithmetic: labels past 255 travel as int32 (SaveImaged
        # writes the bundle's output_dtype)
        stacked = np.stack(label_maps)[:, np.newaxis]
        labels = torch.from_numpy(stacked if stacked.dtype == np.uint8 else stacked.astype(np.int32))
        return MetaTensor(labels, meta=inputs.meta, applied_operations=inputs.applied_operations)


def _batch_values(inputs: MetaTensor, key: str) -> list[Any]:
    """``inputs.meta[key]`` per batch item (collated meta holds lists)."""
    value = inputs.meta.get(key, "")
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values + [values[-1]] * (inputs.shape[0] - len(values))
