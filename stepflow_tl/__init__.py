"""stepflow_tl: Step-Saliency and StepFlow for reasoning models, on TransformerLens.

Implements "Reasoning Fails Where Step Flow Breaks" (arXiv 2604.06695). The package
reads like the method:

- `segment` / `tracker`: traces, steps and exact token offsets, offline and online;
- `hookpoints`: step-level hook points for ``run_with_hooks`` / ``run_with_cache``;
- `pooling`: token-level ``[.., q, k]`` maps to step-level ``[.., step_q, step_k]``;
- `saliency`: Step-Saliency (dense, bounded-memory, from a cache) and step attention;
- `diagnostics` / `stats`: Shallow Lock-in, Deep Decay, group comparisons;
- `interventions` / `generate`: StepFlow (OEB, SMI) and matched controls in KV-cached decoding;
- `problems` / `grading` / `evaluate`: paired studies and ablations;
- `render`: circuitsvis step maps and self-contained HTML reports.
"""

from .backend import adapter
from .diagnostics import Diagnostics, compare, diagnose
from .errors import ModelLoadError, StepflowError, TraceError, UnsupportedModelError
from .generate import Generation, generate
from .hookpoints import attach_trace
from .interventions import (
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    RandomMomentum,
    StepFlow,
    StepMomentum,
)
from .models import load_model, model_info
from .pooling import pool_to_steps
from .saliency import StepSaliency, step_attention, step_saliency, step_saliency_from_cache
from .segment import Step, Trace, load_traces
from .tracker import StepEvent, StepTracker

__version__ = "0.1.0"

__all__ = [
    "Diagnostics", "Generation", "MatchedLogitNoise", "ModelLoadError", "OddsEqualBridge",
    "RandomBridge", "RandomMomentum", "Step", "StepEvent", "StepFlow", "StepMomentum",
    "StepSaliency", "StepTracker", "StepflowError", "Trace", "TraceError",
    "UnsupportedModelError", "adapter", "attach_trace", "compare", "diagnose", "generate",
    "load_model", "load_traces", "model_info", "pool_to_steps", "step_attention",
    "step_saliency", "step_saliency_from_cache",
]
