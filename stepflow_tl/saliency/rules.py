"""Attribution rules and logit targets: what Step-Saliency pools, and what it differentiates
besides a loss.

The authors' extractor (step-saliency, ``src/saliency_extractor.py``) has three rules for
one attention entry ``A[t, k]`` and its gradient ``g = dS/dA[t, k]`` of a scalar ``S``:

- ``"abs"``: ``|A * g|`` (the paper's maps, the default);
- ``"signed"``: ``A * g`` (negative where raising the entry lowers ``S``);
- ``"grad"``: ``|g|``, on the pairs the attention can use (``A > 0``): a masked pair's
  probability is 0 by construction, and the gradient there (``dz . v``) says nothing
  about attention the model could pay. Every mode and the reference leave them out.

and two scalars: a loss (ours, `stepflow_tl.saliency.losses`) or one logit, ``S =
logits[position, token_id]`` (`LogitTarget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..errors import StepflowError
from ..traces.trace import Trace

RULES = ("abs", "signed", "grad")


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise StepflowError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    return rule


def attribution(rule: str, pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The per-entry value ``rule`` pools, from the attention ``pattern`` and its ``grad``
    (same shape, a new tensor)."""
    if rule == "abs":
        return (pattern * grad).abs_()
    if rule == "signed":
        return pattern * grad
    return grad.abs() * (pattern > 0)


@dataclass(frozen=True)
class LogitTarget:
    """The logit of ``token_id`` read at ``position``: ``logits[0, position, token_id]``
    (the prediction of the token after ``position``)."""

    position: int
    token_id: int

    def check(self, n_pos: int, vocab: int) -> "LogitTarget":
        """Itself, if ``position`` lies in a trace of ``n_pos`` tokens and ``token_id`` in a
        vocabulary of ``vocab``; else a `StepflowError` naming the bad value."""
        for name, value, high in (("position", self.position, n_pos), ("token id", self.token_id, vocab)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
                where = "the trace" if name == "position" else "the vocabulary"
                raise StepflowError(f"logit target {name} {value!r} is outside {where} (0 to {high - 1})")
        return self


TargetSpec = Union[LogitTarget, Tuple[int, int], str, None]


def parse_target(text: str) -> LogitTarget:
    """``"POSITION:TOKEN_ID"`` (the CLI's ``--target``) as a `LogitTarget`."""
    try:
        position, token = (int(part) for part in text.split(":"))
    except ValueError:
        raise StepflowError(f"--target must be POSITION:TOKEN_ID (two integers), got {text!r}") from None
    return LogitTarget(position, token)


def resolve_target(target: TargetSpec, trace: Trace, vocab: int,
                   answer_positions: Optional[torch.Tensor] = None) -> LogitTarget:
    """A checked `LogitTarget`: ``target`` itself (a `LogitTarget` or ``(position,
    token_id)``), or for None / ``"answer"`` the answer's first token, read at the position
    before it (``answer_positions``: `losses.answer_token_positions`, given by the caller)."""
    n_pos = int(trace.token_ids.shape[0])
    if target is None or target == "answer":
        if answer_positions is None or answer_positions.numel() == 0:
            raise StepflowError("the logit target defaults to the answer's first token, and this trace has no answer")
        first = int(answer_positions.min())
        if first == 0:
            raise StepflowError("the answer starts at position 0, so no position predicts its first token")
        return LogitTarget(first - 1, int(trace.token_ids[first])).check(n_pos, vocab)
    if isinstance(target, tuple) and len(target) == 2:
        target = LogitTarget(*target)
    if not isinstance(target, LogitTarget):
        raise StepflowError(f"target must be a LogitTarget, (position, token_id) or 'answer', got {target!r}")
    return target.check(n_pos, vocab)
