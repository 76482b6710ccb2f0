"""SAM2-UNet network definition."""

from .hiera import BACKBONE_NAMES, backbone_config, detect_backbone
from .sam2unet import SAM2UNet

__all__ = ["SAM2UNet", "BACKBONE_NAMES", "backbone_config", "detect_backbone"]
