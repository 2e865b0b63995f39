"""The named conditions of a study: which interventions each one runs.

Every single-intervention condition is keyed by its `Intervention.name`, so a results
file, an event log and a condition all use one name for one thing; composites and
placement swaps get names of their own.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Mapping, Sequence, Union

from ..errors import StepflowError
from ..interventions import (
    Intervention,
    MatchedLogitNoise,
    OddsEqualBridge,
    RandomBridge,
    RandomMomentum,
    StepFlow,
    StepMomentum,
)

# What `resolve_conditions` accepts: names of CONDITIONS ("a,b" or a list), or {name: interventions or a
# callable returning them}, or a sequence mixing both.
ConditionSpec = Union[str, Mapping[str, object], Sequence[Union[str, Mapping[str, object]]]]

# Named conditions; each call builds fresh intervention objects.
CONDITIONS: Dict[str, Callable[[], list]] = {
    "baseline": lambda: [],
    **{cls.name: (lambda cls=cls: [cls()]) for cls in (
        StepFlow, OddsEqualBridge, StepMomentum, RandomBridge, MatchedLogitNoise, RandomMomentum)},
    # StepFlow's mechanics with both targets randomised: the control for "stepflow".
    "random_stepflow": lambda: [RandomBridge(), RandomMomentum()],
    # Placement swaps: OEB in the deep layers, SMI in the shallow layers.
    "oeb_top": lambda: [OddsEqualBridge(layers="top_quarter")],
    "smi_bottom": lambda: [StepMomentum(layers="bottom_quarter")],
}
DEFAULT_CONDITIONS = ("baseline", "stepflow", "random_stepflow")
ABLATION = tuple(CONDITIONS)


def resolve_conditions(conditions: ConditionSpec) -> Dict[str, list]:
    """``{name: [interventions]}`` from names of `CONDITIONS`, a mapping of names to
    intervention lists (or to callables returning one), or a mix in a sequence."""
    if isinstance(conditions, str):
        conditions = [c.strip() for c in conditions.split(",") if c.strip()]
    items = conditions.items() if isinstance(conditions, Mapping) else [(c, None) for c in conditions]
    out: Dict[str, list] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name:
            raise StepflowError(f"condition names must be non-empty strings, got {name!r}")
        if spec is None:
            if name not in CONDITIONS:
                raise StepflowError(f"unknown condition {name!r}; expected one of {sorted(CONDITIONS)} "
                                    "or a dict {name: [interventions]}")
            spec = CONDITIONS[name]
        ivs = spec() if callable(spec) else spec
        if not isinstance(ivs, (list, tuple)):
            raise StepflowError(f"condition {name!r} must be a list of interventions, got {type(ivs).__name__}")
        out[name] = list(ivs)
    if not out:
        raise StepflowError("no conditions given")
    return out


def describe(iv: Intervention) -> str:
    """A stable description of an intervention (reprs with memory addresses are not)."""
    text = repr(iv)
    if " at 0x" in text:
        public = {k: v for k, v in sorted(vars(iv).items()) if not k.startswith("_")}
        text = f"{type(iv).__name__}({json.dumps(public, default=str, sort_keys=True)})"
    return text
