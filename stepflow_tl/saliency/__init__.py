"""Step-Saliency: the `StepSaliency` result type, its computation (dense, bounded memory,
tiled, from a cache; plain step attention) and the failure diagnostics read from it."""

from .compute import step_attention, step_saliency, step_saliency_from_cache
from .diagnostics import METRIC_LEGEND, Diagnostics, band_layers, compare, compare_by_accuracy, diagnose
from .maps import StepSaliency
from .receivers import ReceiverHeads, mean_kurtosis, receiver_heads
from .rules import LogitTarget

__all__ = [
    "METRIC_LEGEND", "Diagnostics", "LogitTarget", "ReceiverHeads", "StepSaliency", "band_layers", "compare",
    "compare_by_accuracy", "diagnose", "mean_kurtosis", "receiver_heads", "step_attention", "step_saliency",
    "step_saliency_from_cache",
]
