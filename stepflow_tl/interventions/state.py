"""The step structure of a batch during generation, as the interventions read it.

`StepState` holds one column per token position for every row (device tensors): the
segment code of the token, its step, the segment generation is in, and whether a new
thinking step starts there. `generate` builds it from a `StepTracker` per row; for a
fixed input, `StepState.from_trace(s)` builds it from traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int

from ..tl.adapter import Tokenizer
from ..traces.formats import STEP_KINDS
from ..traces.trace import Trace
from ..traces.tracker import StepTracker, prompt_positions

# Segment codes used in `StepState.segment_code` / `current_segment`: 0 is markup, then
# the step kinds in order.
MARKUP = 0
SEGMENT_CODES = {kind: code for code, kind in enumerate(STEP_KINDS, start=1)}
QUESTION, THINKING, SUMMARY = (SEGMENT_CODES[k] for k in ("question", "thinking", "summary"))
# The bridge of each current segment: question while thinking, thinking while
# summarising; a query in the question (or in markup) has no bridge.
BRIDGE_OF = (MARKUP, MARKUP, QUESTION, THINKING)


@dataclass
class StepState:
    """Per-row step structure of the sequence a model is running, as device tensors.

    All ``[batch, pos]`` tensors cover every position of the sequence processed so far
    (left padding included); `generate` makes a new state with one more column per
    decoded token (`appended`). A state is never changed in place: hooks may reuse what
    they derived from the same state object (the attention groups, once per forward).

    Attributes:
        segment_code: ``[batch, pos]`` int8, segment of each token: 0 markup/pad,
            1 question, 2 thinking, 3 summary.
        step_id: ``[batch, pos]`` int32, global step index of each token, -1 outside steps.
        current_segment: ``[batch, pos]`` int8, the segment the text is in when the
            token at ``pos`` is the query (the tracker's current segment after it).
        new_step: ``[batch, pos]`` bool, the token starts a thinking step that follows
            a thinking step (where SMI injects).
        prefill: ``[batch, pos]`` bool, the token belongs to the prompt of `generate`
            (interventions skip such queries unless ``during_prefill``).
        pad: ``[batch]`` int64, number of left-padding positions of each row.
        row_seed: ``[batch]`` int64, seed of the row for random controls, so a row gets
            the same random draws whatever batch it runs in.
        phase: host-side hint, ``"prefill"`` while `generate` runs the prompt (every
            query is a prompt token, so interventions without ``during_prefill`` skip
            the pass without looking at device tensors), else ``"full"``.
        last_starts_step: host-side hint, whether any row's last position starts a step
            (``new_step``); ``None`` when unknown. Lets SMI skip, without a device sync,
            the decoding steps where it cannot inject (most of them).
    """

    segment_code: Int[torch.Tensor, "batch pos"]
    step_id: Int[torch.Tensor, "batch pos"]
    current_segment: Int[torch.Tensor, "batch pos"]
    new_step: Bool[torch.Tensor, "batch pos"]
    prefill: Bool[torch.Tensor, "batch pos"]
    pad: Int[torch.Tensor, "batch"]
    row_seed: Int[torch.Tensor, "batch"]
    phase: str = "full"
    last_starts_step: Optional[bool] = None

    @property
    def n_pos(self) -> int:
        return int(self.segment_code.shape[1])

    @property
    def device(self) -> torch.device:
        return self.segment_code.device

    @classmethod
    def from_trace(cls, trace: Trace, device: Union[str, torch.device] = None, row_seed: int = 0, prefill: int = 0) -> "StepState":
        """The state of one `Trace` (batch of 1); the first ``prefill`` positions are
        prompt queries (as in `generate`), the others edited queries."""
        return cls.from_rows([_row_from_trace(trace)], device=device, row_seeds=[row_seed],
                             prefill_lengths=[int(prefill)])

    @classmethod
    def from_traces(cls, traces: Sequence[Trace], device: Union[str, torch.device] = None, row_seeds: Optional[Sequence[int]] = None) -> "StepState":
        """The state of a batch of traces, left-padded to the longest (match the tokens
        with `pad_token_ids`)."""
        rows = [_row_from_trace(t) for t in traces]
        seeds = list(row_seeds) if row_seeds is not None else list(range(len(rows)))
        return cls.from_rows(rows, device=device, row_seeds=seeds, prefill_lengths=[0] * len(rows))

    @classmethod
    def from_rows(
        cls,
        rows: Sequence["RowSteps"],
        *,
        device: Union[str, torch.device] = None,
        row_seeds: Sequence[int],
        prefill_lengths: Sequence[int],
    ) -> "StepState":
        """Left-pad per-row step lists into a state."""
        width = max(len(r.segment_code) for r in rows)
        device = torch.device(device) if device is not None else torch.device("cpu")

        def padded(values, fill, dtype):
            out = torch.full((len(rows), width), fill, dtype=dtype)
            for i, v in enumerate(values):
                if len(v):
                    out[i, width - len(v):] = torch.as_tensor(v, dtype=dtype)
            return out.to(device)

        pads = [width - len(r.segment_code) for r in rows]
        prefill = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (p, n) in enumerate(zip(pads, prefill_lengths)):
            prefill[i, p:p + n] = True
        return cls(
            segment_code=padded([r.segment_code for r in rows], MARKUP, torch.int8),
            step_id=padded([r.step_id for r in rows], -1, torch.int32),
            current_segment=padded([r.current_segment for r in rows], MARKUP, torch.int8),
            new_step=padded([r.new_step for r in rows], False, torch.bool),
            prefill=prefill.to(device),
            pad=torch.tensor(pads, dtype=torch.int64, device=device),
            row_seed=torch.tensor(list(row_seeds), dtype=torch.int64, device=device),
            last_starts_step=any(bool(r.new_step[-1]) for r in rows if r.new_step),
        )

    def appended(self, segment_code: Int[torch.Tensor, "batch"], step_id: Int[torch.Tensor, "batch"], current_segment: Int[torch.Tensor, "batch"], new_step: Bool[torch.Tensor, "batch"]) -> "StepState":
        """The state with one more position: each argument is ``[batch]``."""
        cat = lambda old, new: torch.cat([old, new.to(old.device, old.dtype)[:, None]], dim=1)
        return replace(
            self,
            segment_code=cat(self.segment_code, segment_code),
            step_id=cat(self.step_id, step_id),
            current_segment=cat(self.current_segment, current_segment),
            new_step=cat(self.new_step, new_step),
            prefill=cat(self.prefill, torch.zeros_like(new_step, dtype=torch.bool)),
            phase="full",
            # generate builds the new column on the host, where reading it costs no sync
            last_starts_step=bool(new_step.any()) if new_step.device.type == "cpu" else None,
        )


@dataclass
class RowSteps:
    """Step structure of one row, as Python lists (one entry per token)."""

    segment_code: List[int] = field(default_factory=list)
    step_id: List[int] = field(default_factory=list)
    current_segment: List[int] = field(default_factory=list)
    new_step: List[bool] = field(default_factory=list)


def extend_row(row: RowSteps, token_steps: Sequence[int], step_kinds: Sequence[str]) -> RowSteps:
    """Append tokens to ``row`` given their step indices and the kind of every step.

    A token outside steps (markup, -1) has segment code 0; its current segment is the
    segment of the last step that started at or before it (so ``</think>`` still
    counts as thinking), or 0 before any step. ``new_step`` marks the first token of a
    thinking step whose previous step is a thinking step.
    """
    codes = [SEGMENT_CODES[k] for k in step_kinds]
    current = row.current_segment[-1] if row.current_segment else MARKUP
    previous = next((s for s in reversed(row.step_id) if s >= 0), -1)
    for s in token_steps:
        s = int(s)
        code = codes[s] if s >= 0 else MARKUP
        starts = s >= 0 and s != previous
        if s >= 0:
            current, previous = code, s
        row.segment_code.append(code)
        row.step_id.append(s)
        row.current_segment.append(current)
        row.new_step.append(bool(starts and code == THINKING and s > 0 and codes[s - 1] == THINKING))
    return row


def _row_from_trace(trace) -> RowSteps:
    return extend_row(RowSteps(), trace.token_steps.tolist(), [s.kind for s in trace.steps])


class RowTracker:
    """A `StepTracker` for one row plus the per-token lists its `StepState` rows come from
    (``row``); both generation engines keep one per request."""

    def __init__(self, tokenizer: Tokenizer, fmt: str, split: str, prompt_text: str, question: Optional[str],
                 split_summary: bool = False):
        ids, qpos = prompt_positions(tokenizer, prompt_text, question)
        self.prompt_ids = ids
        self.tracker = StepTracker(
            tokenizer, format=fmt, split=split, prompt_ids=ids, question_positions=qpos,
            start_segment="thinking", prompt_text=prompt_text, split_summary=split_summary,
        )
        self._rebuild()

    def _rebuild(self) -> None:
        self.kinds = self.tracker.step_kinds
        self.row = extend_row(RowSteps(), self.tracker.token_steps, self.kinds)

    def push(self, token_id: int) -> bool:
        """Feed the token about to be run; True when earlier positions were re-labelled
        (the tracker rewinds when a multi-token tag completes) and the row was rebuilt."""
        self.tracker.push(int(token_id))
        steps, kinds = self.tracker.token_steps, self.tracker.step_kinds
        n = len(self.row.step_id)
        if self.tracker.changed_from < n or kinds[: len(self.kinds)] != self.kinds:
            self._rebuild()
            return True
        self.kinds = kinds
        extend_row(self.row, steps[n:], kinds)
        return False

    def column(self):
        r = self.row
        return r.segment_code[-1], r.step_id[-1], r.current_segment[-1], r.new_step[-1]
