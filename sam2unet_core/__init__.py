"""sam2unet_core: SAM2-UNet for medical images and volumes.

Main entry points:
    * ``SAM2UNet``: the network (``sam2unet_core.model``).
    * ``load_model`` / ``save_model`` / ``build_model`` / ``read_metadata``: checkpoints of
      every kind (``sam2unet_core.checkpoint``).
    * ``ModelMetadata``: architecture, labels and preprocessing stored with the weights.
    * ``Predictor``: the slice-wise inference engine for volumes and images.
"""

from .checkpoint import build_model, load_model, read_metadata, save_model
from .inference import Predictor
from .metadata import ModelMetadata
from .model import SAM2UNet

__version__ = "0.1.0"

__all__ = ["SAM2UNet", "ModelMetadata", "Predictor", "build_model", "load_model", "read_metadata", "save_model"]
