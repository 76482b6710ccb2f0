"""sam2unet_core: SAM2-UNet for medical images and volumes.

Main entry points (imported on first use, so ``import sam2unet_core.io`` or
``sam2unet_core.metadata`` costs no torch):
    * ``SAM2UNet``: the network (``sam2unet_core.model``).
    * ``load_model`` / ``save_model`` / ``build_model`` / ``read_metadata``: checkpoints of
      every kind (``sam2unet_core.checkpoint``).
    * ``ModelMetadata``: architecture, labels, preprocessing and plane stored with the weights.
    * ``Predictor`` / ``Prediction``: the slice-wise inference engine for volumes and images.
    * ``PredictOptions`` / ``predict_from_files``: segment a file or a folder of cases.
"""

from __future__ import annotations

from .lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_LAZY_NAMES = {
    "SAM2UNet": ".model",
    "ModelMetadata": ".metadata",
    "read_safetensors_metadata": ".metadata",
    "Predictor": ".inference.engine",
    "Prediction": ".inference.engine",
    "PredictOptions": ".inference.batch",
    "predict_from_files": ".inference.batch",
    "build_model": ".checkpoint",
    "load_model": ".checkpoint",
    "read_metadata": ".metadata",
    "save_model": ".checkpoint",
}

__all__ = sorted(_LAZY_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _LAZY_NAMES)
