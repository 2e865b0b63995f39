"""StepFlow: the Odds-Equal Bridge in the shallow layers and Step Momentum Injection in
the deep layers, as one `Intervention`."""

from __future__ import annotations

from typing import List, Optional

from ..errors import StepflowError
from ..tl.adapter import TLModel, adapter
from .base import CompositeRun, Intervention, resolve_layers
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

    @classmethod
    def gpt_oss(cls, model: TLModel, *, tau_max: Optional[float] = None, alpha: Optional[float] = None) -> "StepFlow":
        """The authors' GPT-OSS preset: OEB only on the full-attention layers of its usual
        band (GPT-OSS alternates sliding-window and full attention, `config.layer_types`;
        a sliding layer sees no far step to bridge to), SMI as usual; attention sinks are
        handled as in every OEB run. Raises for a model whose config has no layer types.
        Harmony's reasoning effort goes in the prompt: ``generate(...,
        reasoning_effort="low")``."""
        kinds = adapter(model).layer_types()
        if kinds is None or "full_attention" not in kinds:
            raise StepflowError("the GPT-OSS preset puts OEB on the full-attention layers named by the model "
                                "config's layer_types, and this model's config has none; use StepFlow() instead")
        oeb = OddsEqualBridge(**({} if tau_max is None else {"tau_max": tau_max}))
        full = [l for l in resolve_layers(oeb.layers, model) if kinds[l] == "full_attention"]
        if not full:
            raise StepflowError(f"no full-attention layer among OEB's layers {resolve_layers(oeb.layers, model)} "
                                "(config.layer_types); pass StepFlow(oeb=OddsEqualBridge(layers=...)) yourself")
        return cls(oeb=OddsEqualBridge(layers=full, **({} if tau_max is None else {"tau_max": tau_max})),
                   **({} if alpha is None else {"alpha": alpha}))

    def __repr__(self) -> str:
        return f"StepFlow(oeb={self.oeb!r}, smi={self.smi!r})"

    def parts(self) -> List[Intervention]:
        return [self.oeb, self.smi]

    def install(self, model: TLModel, state: StepState) -> CompositeRun:
        return CompositeRun(self.name, [part.install(model, state) for part in self.parts()])
