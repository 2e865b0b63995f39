"""StepFlow's test-time interventions and their matched controls, as TransformerLens hooks.

- `OddsEqualBridge` (OEB, paper Eqs. 5-8, docs/method.md): per head, the newest query's
  pre-softmax scores get ``lambda_B`` on bridge keys and ``lambda_S`` on current-segment
  keys so that, after softmax, the bridge holds ``tau_B`` of the (non-sink) mass, the
  current segment ``tau_S = 1 - p(O) - tau_B`` and everything else keeps ``p(O)``.
- `StepMomentum` (SMI): at the first token of a new thinking step, ``alpha * m`` is
  added to ``hook_z`` (per head, before W_O), ``m`` the mean value vector of the
  previous step(s).
- `StepFlow`: both, with the paper's defaults.
- Controls at matched strength: `RandomBridge`, `MatchedLogitNoise`, `RandomMomentum`.
- `generate`: KV-cached batched generation that tracks steps online and runs these.

Every intervention reads the per-row step structure from a `StepState` (device
tensors, one column per token position) and installs its hooks through
`stepflow_tl.tl.hooks.temporary_hooks`, which removes exactly the hooks it added on
every exit path. The hooks never synchronise with the host (no ``.item()``/``.cpu()``,
no Python loop over heads): what they did is kept as device tensors in the
`InterventionRun` and turned into `InterventionEvent` rows only when asked.
"""

from .base import Intervention, InterventionEvent, InterventionRun, LayerSpec, apply_interventions, resolve_layers
from .bridge import MatchedLogitNoise, OddsEqualBridge, RandomBridge
from .generate import Generation, generate
from .momentum import RandomMomentum, StepMomentum
from .state import StepState
from .stepflow import StepFlow

__all__ = [
    "Generation", "Intervention", "InterventionEvent", "InterventionRun", "LayerSpec", "MatchedLogitNoise",
    "OddsEqualBridge", "RandomBridge", "RandomMomentum", "StepFlow", "StepMomentum", "StepState",
    "apply_interventions", "generate", "resolve_layers",
]
