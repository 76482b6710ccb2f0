"""Label-map clean-up with MONAI transforms, applied on the whole 3D label volume (torch and
MONAI are imported only when a step runs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import OptionError

__all__ = ["POSTPROCESS_STEPS", "check_steps", "postprocess_labels"]

POSTPROCESS_STEPS = ("largest_component", "fill_holes")


def check_steps(steps: Sequence[str]) -> None:
    """Raise :class:`OptionError` (a ``ValueError``) naming the steps that are not in
    ``POSTPROCESS_STEPS``."""
    unknown = [step for step in steps if step not in POSTPROCESS_STEPS]
    if unknown:
        raise OptionError(f"unknown post-processing {unknown}; expected {POSTPROCESS_STEPS}",
                          "postprocess", list(steps))


def postprocess_labels(
    labels_kji: np.ndarray, steps: Sequence[str], values: Sequence[int]
) -> np.ndarray:
    """Apply ``steps`` in order to a ``(K, J, I)`` label array, each label value separately.

    * ``largest_component``: keep the largest connected component of each label
      (MONAI ``KeepLargestConnectedComponent``, full 3D connectivity).
    * ``fill_holes``: fill enclosed background inside each label (MONAI ``FillHoles``).

    Returns an array of the input's dtype and shape. Raises ``ModuleNotFoundError`` naming
    the steps and the missing package in a torch-free install (the ``onnx`` extra alone).
    """
    try:
        import torch
        from monai.transforms import FillHoles, KeepLargestConnectedComponent
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"post-processing {list(steps)} runs on torch and MONAI, and {err.name!r} is not "
            "installed (install the torch extra: pip install 'sam2unet_core[torch]')",
            name=err.name) from err

    transforms = {
        "largest_component": KeepLargestConnectedComponent(
            applied_labels=list(values), is_onehot=False, independent=True
        ),
        "fill_holes": FillHoles(applied_labels=list(values)),
    }
    check_steps(steps)
    tensor = torch.from_numpy(labels_kji.astype(np.int64))[None]  # (1, K, J, I) channel-first
    for step in steps:
        tensor = transforms[step](tensor)
    return torch.as_tensor(tensor)[0].numpy().astype(labels_kji.dtype)
