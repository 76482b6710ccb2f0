"""Slice-wise inference over volumes: :class:`Predictor` and label post-processing."""

from .engine import TTA_FLIPS, PredictFn, Predictor, ProgressFn, StageTimes
from .postprocess import POSTPROCESS_STEPS, postprocess_labels

__all__ = [
    "Predictor",
    "PredictFn",
    "ProgressFn",
    "StageTimes",
    "TTA_FLIPS",
    "POSTPROCESS_STEPS",
    "postprocess_labels",
]
