"""Shared parts of the interventions: layer specs, the per-row `StepState`, the
event log, the `Intervention` interface, and the counter-based random numbers the
controls use."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..backend import adapter
from ..errors import StepflowError

# Segment codes used in `StepState.segment_code` / `current_segment`.
MARKUP, QUESTION, THINKING, SUMMARY = 0, 1, 2, 3
SEGMENT_CODES = {"question": QUESTION, "thinking": THINKING, "summary": SUMMARY}
# The bridge of each current segment: question while thinking, thinking while
# summarising; a query in the question (or in markup) has no bridge.
_BRIDGE_OF = (MARKUP, MARKUP, QUESTION, THINKING)

LayerSpec = Union[str, int, Sequence[int], range]


# --------------------------------------------------------------------------- layers
def resolve_layers(spec: LayerSpec, model) -> List[int]:
    """Model layer indices from a spec.

    ``"bottom_quarter"`` and ``"top_quarter"`` are the diagnostics' shallow and deep
    bands (`stepflow_tl.diagnostics.band_layers`: a quarter of the layers rounded half
    up, at least one; SmolLM2's 30 layers give 0-7 and 22-29), so interventions act on
    exactly the layers the diagnostics call shallow and deep; ``"all"`` is every layer;
    an int, a list or a range are taken as they are.

    Raises:
        ValueError: for an unknown band name or a layer outside the model.
    """
    from ..diagnostics import band_layers

    a = adapter(model)
    if isinstance(spec, str):
        quarters = band_layers(a.n_layers)
        bands = {
            "bottom_quarter": quarters["shallow"],
            "top_quarter": quarters["deep"],
            "all": range(a.n_layers),
        }
        if spec not in bands:
            raise StepflowError(
                f"unknown layer band {spec!r}; expected one of {sorted(bands)}, an int, a list or a range"
            )
        spec = bands[spec]
    elif isinstance(spec, int):
        spec = [spec]
    layers = a.check_layers(list(spec))
    if not layers:
        raise StepflowError("the layer spec selects no layer")
    return sorted(set(layers))


# --------------------------------------------------------------------------- state
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

    segment_code: torch.Tensor
    step_id: torch.Tensor
    current_segment: torch.Tensor
    new_step: torch.Tensor
    prefill: torch.Tensor
    pad: torch.Tensor
    row_seed: torch.Tensor
    phase: str = "full"
    last_starts_step: Optional[bool] = None

    @property
    def n_pos(self) -> int:
        return int(self.segment_code.shape[1])

    @property
    def device(self) -> torch.device:
        return self.segment_code.device

    @classmethod
    def from_trace(cls, trace, device=None, row_seed: int = 0) -> "StepState":
        """The state of one `Trace` (batch of 1), every position a non-prompt query."""
        return cls.from_traces([trace], device=device, row_seeds=[row_seed])

    @classmethod
    def from_traces(cls, traces, device=None, row_seeds: Optional[Sequence[int]] = None) -> "StepState":
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
        device=None,
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

    def appended(self, segment_code, step_id, current_segment, new_step) -> "StepState":
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


def pad_token_ids(traces, pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[batch, pos]`` token ids and attention mask of a batch of traces."""
    width = max(len(t.token_ids) for t in traces)
    tokens = torch.full((len(traces), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(traces), width), dtype=torch.long)
    for i, t in enumerate(traces):
        n = len(t.token_ids)
        tokens[i, width - n:] = t.token_ids
        mask[i, width - n:] = 1
    return tokens, mask


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class InterventionEvent:
    """What one intervention did at one layer for one query token of one row.

    ``position`` is the absolute position in the row (left padding removed).
    OEB-like rows fill ``lambda_b``/``lambda_s`` (mean over the heads that fired) and
    ``kl`` (mean KL(new || old) of the attention distribution over those heads);
    SMI-like rows fill ``injected_norm`` (mean over heads of ``|alpha * m_h|``).
    """

    intervention: str
    row: int
    layer: int
    position: int
    step: int
    n_heads: int
    lambda_b: float = float("nan")
    lambda_s: float = float("nan")
    kl: float = float("nan")
    injected_norm: float = float("nan")


class PerStateCache:
    """The last value built from one `StepState` object and a key (e.g. shapes).

    The edited layers of one forward see the same state, so they share what is derived
    from it. States are never changed in place, so the same object and key mean the same
    value; a new state object (the next token) rebuilds it.
    """

    def __init__(self):
        self._state: Optional[StepState] = None
        self._key: Any = None
        self._value: Any = None

    def get(self, state: StepState, key: Any, build: Callable[[], Any]) -> Any:
        if self._state is not state or self._key != key:
            self._state, self._key, self._value = state, key, build()
        return self._value


class InterventionRun:
    """The hooks of one intervention installed for one model and one `StepState`,
    with the device-side record of what they did.

    ``state`` may be replaced between forward passes (``run.state = new_state``);
    `generate` does that once per token.
    """

    def __init__(self, name: str, state: StepState):
        self.name = name
        self.state = state
        self.hooks: List[Tuple[str, Callable]] = []
        self._records: List[Tuple[str, int, int, Dict[str, torch.Tensor]]] = []

    def record(self, kind: str, layer: int, q_start: int, **tensors: torch.Tensor) -> None:
        """Keep ``[batch, head, q]`` tensors of one hook call (detached, on device)."""
        self._records.append((kind, layer, q_start, {k: v.detach() for k, v in tensors.items()}))

    def events(self) -> List[InterventionEvent]:
        """Every (row, layer, query) where the intervention acted. Syncs with the host
        once per recorded quantity, not once per hook call."""
        if not self._records:
            return []
        pad = self.state.pad.cpu()
        step_id = self.state.step_id.cpu()
        keys = sorted({k for _, _, _, rec in self._records for k in rec})
        flat = {}
        for k in keys:
            parts = [rec[k].float().flatten() if k in rec else torch.full((rec["fired"].numel(),), float("nan"),
                     device=rec["fired"].device) for _, _, _, rec in self._records]
            flat[k] = torch.cat(parts).cpu()
        out: List[InterventionEvent] = []
        offset = 0
        for kind, layer, q_start, rec in self._records:
            shape = rec["fired"].shape  # [batch, head, q]
            n = rec["fired"].numel()
            vals = {k: v[offset:offset + n].reshape(shape) for k, v in flat.items()}
            offset += n
            fired = vals["fired"] > 0
            n_heads = fired.sum(dim=1)  # [batch, q]
            for b, q in (n_heads > 0).nonzero().tolist():
                heads = fired[b, :, q]
                mean = lambda t: float(t[b, :, q][heads].mean())
                pos = q_start + q
                kw = dict(
                    intervention=self.name,
                    row=b,
                    layer=layer,
                    position=int(pos - pad[b]),
                    step=int(step_id[b, pos]) if pos < step_id.shape[1] else -1,
                    n_heads=int(n_heads[b, q]),
                )
                if kind == "attn":
                    kw.update(lambda_b=mean(vals["lambda_b"]), lambda_s=mean(vals["lambda_s"]), kl=mean(vals["kl"]))
                else:
                    kw.update(injected_norm=mean(vals["norm"]))
                out.append(InterventionEvent(**kw))
        return out

    def per_query(self, key: str) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Raw records: ``(layer, fired [batch, head, q], values [batch, head, q])``."""
        return [(layer, rec["fired"], rec[key]) for _, layer, _, rec in self._records if key in rec]


# --------------------------------------------------------------------------- base
class Intervention:
    """One interface: `install` builds the hooks for a model and a `StepState`;
    `applied` installs them for the duration of a ``with`` block."""

    name = "intervention"

    def install(self, model, state: StepState) -> InterventionRun:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model, state: StepState) -> Iterator[InterventionRun]:
        """``with oeb.applied(model, state) as run: model(tokens)``; hooks removed on exit."""
        with apply_interventions([self], model, state) as runs:
            yield runs[0]


@contextlib.contextmanager
def apply_interventions(interventions: Sequence[Intervention], model, state: StepState) -> Iterator[List[InterventionRun]]:
    """Install several interventions at once (their hooks compose in list order)."""
    runs = [iv.install(model, state) for iv in _flatten(interventions)]
    hooks = [h for run in runs for h in run.hooks]
    with model.hooks(fwd_hooks=hooks):
        yield runs


def _flatten(interventions) -> List[Intervention]:
    out: List[Intervention] = []
    for iv in interventions:
        if hasattr(iv, "parts"):  # a composite such as StepFlow
            out.extend(iv.parts())
        elif isinstance(iv, Intervention):
            out.append(iv)
        else:
            raise StepflowError(f"expected an Intervention, got {type(iv).__name__}")
    return out


# --------------------------------------------------------------------------- hash RNG
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 arithmetic that never overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return ((x >> 16) ^ x) & _M32


def hash_uniform(*keys: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float32 numbers that depend only on the integer keys (broadcast).

    Counter-based, so a row's random draws depend on its seed and positions, not on
    the batch it runs in or on the order of calls; no generator state to carry.
    """
    h = torch.zeros((), dtype=torch.int64, device=keys[0].device)
    for k in keys:
        h = _mix32((h ^ (k.to(torch.int64) & _M32)) + 0x9E3779B9)
    return (h.to(torch.float64) + 0.5).div(2.0 ** 32).to(torch.float32)


def hash_normal(*keys: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 numbers from the keys (Box-Muller)."""
    u1 = hash_uniform(*keys, torch.tensor(1, device=keys[0].device))
    u2 = hash_uniform(*keys, torch.tensor(2, device=keys[0].device))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
