"""Slice-wise inference over volumes: the backend-neutral :class:`Predictor` (no torch),
its model runners (``torch_runner.TorchRunner``), the folder layer (``batch``) and label
post-processing."""

from .engine import ModelRunner, PendingBatch, Prediction, Predictor, ProgressFn, StageTimes
from .postprocess import POSTPROCESS_STEPS, postprocess_labels

__all__ = [
    "ModelRunner",
    "PendingBatch",
    "Prediction",
    "Predictor",
    "ProgressFn",
    "StageTimes",
    "POSTPROCESS_STEPS",
    "postprocess_labels",
]
