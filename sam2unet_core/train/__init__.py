"""Training SAM2-UNet with MONAI data pipelines.

* :mod:`.config`: ``TrainConfig`` (YAML + ``section.key=value`` overrides);
* :mod:`.datasets` / :mod:`.pipeline` / :mod:`.transforms`: PraNet image folders and
  nnU-Net/MSD volume datasets served as seeded 2D (2.5D) samples;
* :mod:`.losses`: structure loss (binary) and Dice+CE (multi-class), deep supervision;
* :mod:`.trainer`: the loop (validation, checkpoints, exact resume, TensorBoard, DDP);
* :mod:`.resume`: the ``resume.pt`` state.

Run it with ``sam2unet-train --config X.yaml`` (:mod:`sam2unet_core.cli.train`).
"""

from .config import TrainConfig, load_config
from .losses import DeepSupervisionLoss, structure_loss
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "load_config", "train", "TrainResult", "DeepSupervisionLoss", "structure_loss"]
