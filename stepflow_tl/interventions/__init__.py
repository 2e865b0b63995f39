"""StepFlow's test-time interventions and their matched controls, as TransformerLens hooks.

- `OddsEqualBridge` (OEB, paper Eqs. 5-8): per head, the newest query's pre-softmax
  scores get ``lambda_B`` on bridge keys and ``lambda_S`` on current-segment keys so
  that, after softmax, the bridge holds ``tau_B`` of the (non-sink) mass, the current
  segment ``tau_S = 1 - p(O) - tau_B`` and everything else keeps ``p(O)``.
- `StepMomentum` (SMI): at the first token of a new thinking step, ``alpha * m`` is
  added to ``hook_z`` (per head, before W_O), ``m`` the mean value vector of the
  previous step(s).
- `StepFlow`: both, with the paper's defaults.
- Controls at matched strength: `RandomBridge`, `MatchedLogitNoise`, `RandomMomentum`.

Every intervention reads the per-row step structure from a `StepState` (device
tensors, one column per token position) and installs hooks through
``model.hooks(...)``, which removes exactly the hooks it added on every exit path.
The hooks never synchronise with the host (no ``.item()``/``.cpu()``, no Python loop
over heads): what they did is kept as device tensors in the `InterventionRun` and
turned into `InterventionEvent` rows only when asked.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from ..errors import StepflowError
from .base import (
    MARKUP,
    QUESTION,
    SEGMENT_CODES,
    SUMMARY,
    THINKING,
    Intervention,
    InterventionEvent,
    InterventionRun,
    LayerSpec,
    RowSteps,
    StepState,
    apply_interventions,
    extend_row,
    hash_normal,
    hash_uniform,
    pad_token_ids,
    resolve_layers,
)
from .bridge import (
    MatchedLogitNoise,
    OddsEqualBridge,
    OddsEqualEdit,
    RandomBridge,
    group_masses,
    matched_noise_scale,
    odds_equal_edit,
)
from .momentum import RandomMomentum, StepMomentum

# --------------------------------------------------------------------------- StepFlow
class StepFlow(Intervention):
    """OEB and SMI together; defaults are the paper's (OEB on the bottom quarter with
    tau_max 0.15, SMI on the top quarter with alpha 0.06)."""

    name = "stepflow"

    def __init__(self, oeb: Optional[Intervention] = None, smi: Optional[Intervention] = None):
        self.oeb = OddsEqualBridge() if oeb is None else oeb
        self.smi = StepMomentum() if smi is None else smi

    def __repr__(self) -> str:
        return f"StepFlow(oeb={self.oeb!r}, smi={self.smi!r})"

    def parts(self) -> List[Intervention]:
        return [p for p in (self.oeb, self.smi) if p is not None]

    def install(self, model, state: StepState) -> InterventionRun:
        raise StepflowError("StepFlow installs its parts; use apply_interventions([StepFlow()], ...) or .applied()")

    @contextlib.contextmanager
    def applied(self, model, state: StepState) -> Iterator[List[InterventionRun]]:
        with apply_interventions(self.parts(), model, state) as runs:
            yield runs


__all__ = [
    "MARKUP", "QUESTION", "THINKING", "SUMMARY", "SEGMENT_CODES", "LayerSpec",
    "Intervention", "InterventionEvent", "InterventionRun", "RowSteps", "StepState",
    "apply_interventions", "extend_row", "pad_token_ids", "resolve_layers",
    "hash_uniform", "hash_normal",
    "OddsEqualBridge", "RandomBridge", "MatchedLogitNoise", "OddsEqualEdit",
    "odds_equal_edit", "group_masses", "matched_noise_scale",
    "StepMomentum", "RandomMomentum", "StepFlow",
]
