"""StepFlow: the Odds-Equal Bridge in the shallow layers and Step Momentum Injection in
the deep layers, as one `Intervention`."""

from __future__ import annotations

from typing import List, Optional

from ..errors import StepflowError
from ..tl.adapter import TLModel
from .base import CompositeRun, Intervention
from .bridge import OddsEqualBridge
from .momentum import StepMomentum
from .state import StepState


class StepFlow(Intervention):
    """OEB and SMI together; defaults are the paper's (OEB on the bottom quarter with
    tau_max 0.15, SMI on the top quarter with alpha 0.06).

    ``StepFlow(tau_max=0.1, alpha=0.04)`` sets the paper's two hyperparameters on the
    default parts; ``StepFlow(oeb=OddsEqualBridge(...), smi=StepMomentum(...))`` gives
    the parts themselves (``None``: the default part). Like every intervention,
    ``install`` returns one run (a `CompositeRun` whose events keep each part's name)
    and ``applied`` yields it.
    """

    name = "stepflow"

    def __init__(
        self,
        oeb: Optional[Intervention] = None,
        smi: Optional[Intervention] = None,
        *,
        tau_max: Optional[float] = None,
        alpha: Optional[float] = None,
    ):
        for part_name, part in (("oeb", oeb), ("smi", smi)):
            if part is not None and not isinstance(part, Intervention):
                raise StepflowError(f"StepFlow: {part_name} must be an Intervention (e.g. "
                                    f"{'OddsEqualBridge' if part_name == 'oeb' else 'StepMomentum'}(...)) or None "
                                    f"for the paper's default, got {type(part).__name__}")
        if oeb is not None and tau_max is not None:
            raise StepflowError("give tau_max either directly or inside oeb=OddsEqualBridge(tau_max=...), not both")
        if smi is not None and alpha is not None:
            raise StepflowError("give alpha either directly or inside smi=StepMomentum(alpha=...), not both")
        self.oeb = oeb if oeb is not None else OddsEqualBridge(**({} if tau_max is None else {"tau_max": tau_max}))
        self.smi = smi if smi is not None else StepMomentum(**({} if alpha is None else {"alpha": alpha}))

    def __repr__(self) -> str:
        return f"StepFlow(oeb={self.oeb!r}, smi={self.smi!r})"

    def parts(self) -> List[Intervention]:
        return [self.oeb, self.smi]

    def install(self, model: TLModel, state: StepState) -> CompositeRun:
        return CompositeRun(self.name, [part.install(model, state) for part in self.parts()])
