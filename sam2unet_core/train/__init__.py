"""Training SAM2-UNet with MONAI data pipelines.

* :mod:`.config`: ``TrainConfig`` (YAML + ``section.key=value`` overrides);
* :mod:`.datasets` / :mod:`.pipeline` / :mod:`.transforms`: PraNet image folders and
  nnU-Net/MSD volume datasets served as seeded 2D (2.5D) samples;
* :mod:`.losses`: structure loss (binary) and Dice+CE (multi-class), deep supervision;
* :mod:`.trainer`: ``Trainer`` (validation, checkpoints, exact resume, DDP);
  :mod:`.callbacks`: its hooks (TensorBoard, progress events); :mod:`.schedule`: learning
  rate and time box;
* :mod:`.init_from`: continuing from one of our models (``model.init_from``);
* :mod:`.from_pairs`: training from (image, label map) volume pairs without a config;
* :mod:`.resume`: the ``resume.pt`` state.

Run it with ``sam2unet-train --config X.yaml`` or ``--request pairs.json``
(:mod:`sam2unet_core.cli.train`).
"""

from .config import TrainConfig, load_config
from .from_pairs import TrainingPair, TrainingRequest, train_from_pairs
from .losses import DeepSupervisionLoss, structure_loss
from .callbacks import TrainerCallback
from .trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "load_config", "train", "Trainer", "TrainerCallback", "TrainResult", "TrainingPair",
           "TrainingRequest", "train_from_pairs", "DeepSupervisionLoss", "structure_loss"]
