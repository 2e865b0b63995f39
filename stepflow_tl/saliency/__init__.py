"""Step-Saliency: the `StepSaliency` result type, its computation (dense, bounded memory,
tiled, from a cache; plain step attention) and the failure diagnostics read from it."""

from .compute import step_attention, step_saliency, step_saliency_from_cache
from .diagnostics import METRIC_LEGEND, Diagnostics, band_layers, compare, diagnose
from .maps import StepSaliency

__all__ = [
    "METRIC_LEGEND", "Diagnostics", "StepSaliency", "band_layers", "compare", "diagnose", "step_attention", "step_saliency",
    "step_saliency_from_cache",
]
