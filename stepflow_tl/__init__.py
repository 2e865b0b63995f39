"""stepflow_tl: Step-Saliency and StepFlow for reasoning models, on TransformerLens.

Implements "Reasoning Fails Where Step Flow Breaks" (arXiv 2604.06695); docs/method.md
states the method, docs/architecture.md the layout. Everything a researcher needs is
importable from here, and only from here; specialised tools live in their subpackage
(`stepflow_tl.stats`, `stepflow_tl.viz`, `stepflow_tl.study`, ...):

- traces: `Trace`, `load_traces`, `StepTracker`, `attach_trace` (step hook points),
  `pool_to_steps`;
- Step-Saliency: `step_saliency`, `step_saliency_from_cache`, `step_attention`, the
  `StepSaliency` result, `diagnose` / `compare` (Shallow Lock-in, Deep Decay);
- StepFlow: `StepFlow`, `OddsEqualBridge`, `StepMomentum`, the matched controls,
  `generate` (KV-cached, steps tracked online), `StepState`;
- studies: `load_problems`, `builtin_suite`, `evaluate`, `ablate`, `load_study`,
  `StudyResult`;
- models: `load_model`, `model_info`.
"""

from .errors import ModelLoadError, StepflowError, TraceError, UnsupportedModelError
from .interventions import (
    Generation,
    Intervention,
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    RandomMomentum,
    StepFlow,
    StepMomentum,
    StepState,
    generate,
)
from .saliency import (
    Diagnostics,
    StepSaliency,
    compare,
    diagnose,
    step_attention,
    step_saliency,
    step_saliency_from_cache,
)
from .study import Problem, StudyResult, ablate, builtin_suite, evaluate, load_problems, load_study
from .tl import DTYPES, load_model, model_info
from .traces import Step, StepEvent, StepTracker, Trace, TraceWarning, attach_trace, load_traces, pool_to_steps
from .traces.formats import render_prompt

__version__ = "0.1.0"

__all__ = [
    "DTYPES", "Diagnostics", "Generation", "Intervention", "MatchedLogitNoise", "ModelLoadError", "OddsEqualBridge",
    "Problem", "RandomBridge", "RandomMomentum", "Step", "StepEvent", "StepFlow", "StepMomentum", "StepSaliency",
    "StepState", "StepTracker", "StepflowError", "StudyResult", "Trace", "TraceError", "TraceWarning",
    "UnsupportedModelError", "ablate", "attach_trace", "builtin_suite", "compare", "diagnose", "evaluate",
    "generate", "load_model", "load_problems", "load_study", "load_traces", "model_info", "pool_to_steps",
    "render_prompt", "step_attention", "step_saliency", "step_saliency_from_cache",
]
