"""The scalars Step-Saliency differentiates: built-in losses by name (``"sequence"``,
``"summary"``, ``"answer"``), one logit (``"logit"``, `rules.LogitTarget`) or a callable,
and the block-wise form of a built-in one that bounded and tiled modes compute inside the
unembedding."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from jaxtyping import Int

from ..errors import StepflowError
from ..tl.adapter import TLModel
from ..tl.hooks import shadow_forward
from ..traces.formats import stated_answer_span
from ..traces.trace import Trace
from .rules import LogitTarget

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
# "logit" is not a loss but the authors' other scalar: one logit, S = logits[position, token]
LOSSES = ("sequence", "summary", "answer", "logit")


def _token_positions(trace, kinds: Iterable[str]) -> torch.Tensor:
    wanted = [s.index for s in trace.steps if s.kind in kinds]
    return torch.isin(trace.token_steps, torch.tensor(wanted, dtype=torch.long)).nonzero()[:, 0]


def answer_token_positions(trace: Trace) -> Int[torch.Tensor, "n"]:
    """Token positions of the final answer inside the summary.

    The answer is the content of the last ``\\boxed{...}`` in the summary, else the
    text after the last ``Answer:``; tokens that overlap it count.
    """
    summary = [s for s in trace.steps if s.kind == "summary"]
    if not summary:
        raise StepflowError("loss='answer' needs a trace with a summary")
    start, end = summary[0].char_span[0], summary[-1].char_span[1]
    span = stated_answer_span(trace.text[start:end])
    if span is None:
        raise StepflowError(
            "loss='answer' found no answer in the summary (no \\boxed{...} and no 'Answer:')"
        )
    a, b = start + span[0], start + span[1]
    if trace.token_offsets is None:
        raise StepflowError("loss='answer' needs token offsets; rebuild the trace with Trace.from_text/from_parts")
    offsets = trace.token_offsets
    return ((offsets[:, 0] < b) & (offsets[:, 1] > a)).nonzero()[:, 0]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 products and log-softmaxes lose digits; float64 models keep theirs."""
    return x if x.dtype == torch.float64 else x.float()


def _target_ce(logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting the tokens at ``positions`` (each from the one before)."""
    positions = positions[positions > 0].to(logits.device)
    if positions.numel() == 0:
        raise StepflowError("the loss covers no predictable tokens")
    logp = torch.log_softmax(at_least_fp32(logits[0, positions - 1]), dim=-1)
    return -logp.gather(-1, token_ids.to(logits.device)[positions, None]).mean()


def loss_target_positions(loss: str, trace: Trace) -> Int[torch.Tensor, "n"]:
    """Token positions whose prediction a built-in loss scores, ``[n]`` long (``"logit"``:
    the answer's tokens, whose first one is the default logit target)."""
    if loss == "sequence":
        return torch.arange(1, trace.token_ids.shape[0])
    if loss == "summary":
        positions = _token_positions(trace, ("summary",))
        if positions.numel() == 0:
            raise StepflowError("loss='summary' needs a trace with summary tokens")
        return positions
    if loss in ("answer", "logit"):
        return answer_token_positions(trace)
    raise StepflowError(f"loss must be one of {LOSSES} or a callable(logits, trace), got {loss!r}")


def resolve_loss(
    loss: Union[str, LossFn], trace: Trace, positions: Optional[Int[torch.Tensor, "n"]] = None,
    logit: Optional[LogitTarget] = None,
) -> tuple:
    """``(name, fn(logits [1, pos, vocab]) -> scalar)`` for a loss spec; ``positions``: the
    built-in loss's `loss_target_positions` when the caller has them already; ``logit``: the
    checked target of ``loss="logit"``."""
    if callable(loss):
        return getattr(loss, "__name__", "callable"), lambda logits: loss(logits, trace)
    if loss == "logit":
        return loss, lambda logits: at_least_fp32(logits[0, logit.position, logit.token_id])
    if positions is None:
        positions = loss_target_positions(loss, trace)
    return loss, lambda logits: _target_ce(logits, trace.token_ids, positions)


class _PrecomputedGradient(torch.autograd.Function):
    """``value``, whose gradient with respect to ``x`` was computed with it
    (``grad_x``), as a function of ``x``: the backward only scales ``grad_x`` by the
    value's own upstream gradient (1 where the value is the differentiated scalar)."""

    @staticmethod
    def forward(ctx, x, value, grad_x):
        ctx.save_for_backward(grad_x)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        (grad_x,) = ctx.saved_tensors
        return grad_x * upstream.to(grad_x.dtype), None, None


class LossInUnembedding:
    """Compute a built-in loss inside the unembedding, one block of positions at a time.

    Used by bounded and tiled modes. Otherwise the ``[1, pos, vocab]`` logits, their
    log-softmax and its gradient (~4 such copies) are the largest tensors of the run:
    1.5 GiB at T = 2048 on SmolLM2's 49k vocabulary, ~40 GB at T = 16k on a
    152k-vocabulary model; on a CPU, writing them (fresh pages each) took about a fifth
    of a tiled run of SmolLM2 at 1,024 tokens (docs/performance.md). ``unembed.forward``
    is shadowed (`stepflow_tl.tl.hooks.shadow_forward`) for the duration: it receives the
    final normalised residual ``[1, pos, d_model]``, unembeds a block of predicting positions
    at a time and, while that block's logits exist, also takes the block's gradient with
    respect to its residual rows, so one block's logits exist at a time and none is
    recomputed in the backward. It sums their cross-entropy into ``self.loss`` (whose
    backward hands on those gradients, `_PrecomputedGradient`) and hands the model a
    zero-stride stand-in for the logits. Each block gets the upstream gradient autograd
    would hand it, so its gradient is the one a backward through the block computes, op
    for op (the maps are those of the dense mode's whole logits bit for bit in fp32, in
    every case tested).

    With ``logit`` (a `LogitTarget`) the scalar is that one logit instead, computed in the
    block of positions that ends at its position.

    The loss is only right if nothing transforms the logits after the unembedding
    (soft-capping, a logit scale): `check_output` raises unless the model returned the
    stand-in untouched.
    """

    # Elements of one block's logits: 64 MB in fp32, whatever the vocabulary.
    LOGIT_ELEMENTS = 1 << 24

    def __init__(self, model: TLModel, token_ids: torch.Tensor, positions: Optional[torch.Tensor],
                 logit: Optional[LogitTarget] = None):
        self.unembed = model.unembed
        self.vocab = int(model.cfg.d_vocab_out)
        self.logit = logit
        if logit is not None:
            self.predicting = torch.tensor([logit.position])
            self.targets = torch.tensor([logit.token_id])
        else:
            positions = torch.unique(positions[positions > 0])  # sorted
            if positions.numel() == 0:
                raise StepflowError("the loss covers no predictable tokens")
            self.predicting = positions - 1
            self.targets = token_ids[positions]
        self.loss: Optional[torch.Tensor] = None
        self.stand_in: Optional[torch.Tensor] = None

    def _block_losses(self, unembed, resid, args, kwargs) -> torch.Tensor:
        """Mean cross-entropy (or the logit) of ``self.predicting``, from ``resid [1, pos, d_model]``.

        Blocks are runs of consecutive positions, as long as the budget allows, even
        when the loss scores only a few of them (``loss="answer"``): a matrix product
        over a handful of rows takes another BLAS path than the dense mode's
        whole-sequence one and rounds differently (measured: 1e-5 relative in the maps
        of SmolLM2 with a 3-token answer), while blocks of hundreds of rows give the
        dense mode's numbers bit for bit in every case measured.
        """
        predicting = self.predicting.to(resid.device)
        targets = self.targets.to(resid.device)
        read_logit = self.logit is not None

        def block_sum(rows_resid, rows, block_targets):
            logits = at_least_fp32(unembed(rows_resid, *args, **kwargs)[0, rows])
            if read_logit:
                return logits.gather(-1, block_targets[:, None]).sum()
            return -torch.log_softmax(logits, dim=-1).gather(-1, block_targets[:, None]).sum()

        length = max(1, self.LOGIT_ELEMENTS // self.vocab)
        stop = int(predicting[-1]) + 1
        lowest = max(0, min(int(predicting[0]), stop - length))
        total, grad, upstream = 0.0, torch.zeros_like(resid), None
        for block_stop in range(stop, lowest, -length):
            block_start = max(lowest, block_stop - length)
            inside = (predicting >= block_start) & (predicting < block_stop)
            if bool(inside.any()):
                rows_resid = resid[:, block_start:block_stop].detach().requires_grad_(True)
                block = block_sum(rows_resid, predicting[inside] - block_start, targets[inside])
                if upstream is None:  # what autograd hands each block sum: d(total / n) / d(block sum)
                    upstream = torch.ones_like(block) / predicting.numel()
                grad[:, block_start:block_stop] = torch.autograd.grad(block, rows_resid, upstream)[0]
                total = total + block.detach()
        return _PrecomputedGradient.apply(resid, total / predicting.numel(), grad)

    def __enter__(self):
        original = self.unembed.forward

        def forward(resid, *args, **kwargs):
            self.loss = self._block_losses(original, resid, args, kwargs)
            self.stand_in = resid.new_zeros(()).expand(*resid.shape[:-1], self.vocab)
            return self.stand_in

        self._shadow = shadow_forward(self.unembed, forward)
        self._shadow.__enter__()
        return self

    def __exit__(self, *exc):
        self._shadow.__exit__(*exc)
        return False

    @staticmethod
    def logits_untouched(model: TLModel, run: Callable[[torch.Tensor], torch.Tensor],
                         token_ids: torch.Tensor) -> bool:
        """Whether ``run(tokens)`` (the model's forward) returns the unembedding's output
        unchanged, found without gradients on the first token, with an unembedding that
        returns ones: a model that changes them (soft-capping, a logit scale, in place
        or not) returns another tensor or other values."""
        marker = []

        def forward(resid, *args, **kwargs):
            marker.append(resid.new_ones(*resid.shape[:-1], int(model.cfg.d_vocab_out)))
            return marker[-1]

        with torch.no_grad(), shadow_forward(model.unembed, forward):
            output = run(token_ids[None, :1])
        return len(marker) == 1 and output is marker[0] and bool((output == 1).all())

    def check_output(self, output: torch.Tensor) -> torch.Tensor:
        """The loss, once the model's ``output`` is known to be the untouched logits."""
        if self.loss is None or output is not self.stand_in:
            raise StepflowError(
                "this model transforms its logits after the unembedding (e.g. soft-capping "
                "or a logit scale), so the loss cannot be computed block by block under "
                "checkpointing; use mode='dense', mode='tiled' with checkpoint=False, or pass "
                "the loss as a callable(logits, trace)"
            )
        return self.loss


# Deprecated alias of the old lowercase name, removed in the next release (docs/architecture.md).
loss_in_unembedding = LossInUnembedding
