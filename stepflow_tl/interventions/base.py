"""Shared parts of the interventions: layer specs, the event log, the `Intervention`
interface, and the counter-based random numbers the controls use. The per-row step
structure they read is `stepflow_tl.interventions.state`."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..checks import check_int
from ..errors import StepflowError
from ..saliency.diagnostics import band_layers
from ..tl.adapter import TLModel, adapter
from ..tl.hooks import temporary_hooks
from ..traces.trace import Trace
from .state import StepState

LayerSpec = Union[str, int, Sequence[int], range]


# --------------------------------------------------------------------------- layers
# The layer specs that name a band, and the diagnostics band (`BANDS`) each one is; "all" is
# every layer. The spellings are part of every results file (an intervention is recorded by
# its repr and a resumed study compares them), so they stay; `BANDS` is the one band vocabulary.
LAYER_BANDS: dict[str, str | None] = {"bottom_quarter": "shallow", "top_quarter": "deep", "all": None}


def check_layer_spec(spec: LayerSpec, name: str = "layers") -> LayerSpec:
    """``spec`` checked without a model (interventions call it at construction): a band
    name from `LAYER_BANDS`, a layer index >= 0, a range, or a non-empty list of indices.
    Returns it with numpy integers made ints; ``[1.5]`` and ``[True]`` are refused
    rather than read as layer 1."""
    if isinstance(spec, str):
        if spec not in LAYER_BANDS:
            raise StepflowError(f"unknown layer band {spec!r} for {name}; expected one of {list(LAYER_BANDS)}, "
                                "a layer index, a list or a range")
        return spec
    if isinstance(spec, range):
        if not len(spec) or min(spec) < 0:
            raise StepflowError(f"{name} must be a non-empty range of layers >= 0, got {spec!r}")
        return spec
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise StepflowError(f"{name} selects no layer (an empty list)")
        return [check_int(f"{name}[{i}]", layer, low=0) for i, layer in enumerate(spec)]
    if not hasattr(spec, "__index__"):
        raise StepflowError(f"{name} must be a band name {list(LAYER_BANDS)}, a layer index, a list or a range of "
                            f"layer indices, got {spec!r}")
    return check_int(name, spec, low=0)


def resolve_layers(spec: LayerSpec, model: TLModel) -> List[int]:
    """Model layer indices from a spec.

    ``"bottom_quarter"`` and ``"top_quarter"`` are the diagnostics' ``"shallow"`` and
    ``"deep"`` bands (`LAYER_BANDS`; `stepflow_tl.saliency.diagnostics.band_layers`: a quarter of
    the layers rounded half up, at least one; SmolLM2's 30 layers give 0-7 and 22-29), so
    interventions act on exactly the layers the diagnostics call shallow and deep; ``"all"`` is
    every layer;
    an int, a list or a range are taken as they are.

    Raises:
        StepflowError: for a spec `check_layer_spec` refuses or a layer outside the model.
    """
    return sorted(set(adapter(model).check_layers(layer_indices(spec, adapter(model).n_layers))))


def layer_indices(spec: LayerSpec, n_layers: int) -> List[int]:
    """The layer indices a spec names in a model of ``n_layers`` layers (as
    `resolve_layers`, for an engine that has no TL model; the caller checks the range)."""
    spec = check_layer_spec(spec)
    if isinstance(spec, str):
        band = LAYER_BANDS[spec]
        spec = range(n_layers) if band is None else band_layers(n_layers)[band]
    elif isinstance(spec, int):
        spec = [spec]
    return sorted(set(spec))


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
        self._row_buffers: List[dict] = []

    def row_buffer(self) -> dict:
        """A dict for a hook's per-row history across forwards: ``{"v": [batch, cap, ...],
        "n": filled positions}`` with position ``p`` of the batch's columns in ``v[:, p]``.
        `generate` keeps it aligned with the batch when rows leave or join (`keep_rows`,
        `park` / `join`)."""
        buffer: dict = {}
        self._row_buffers.append(buffer)
        return buffer

    def keep_rows(self, rows: Sequence[int], drop_columns: int) -> None:
        """Only batch rows ``rows`` remain, and the first ``drop_columns`` positions go."""
        for buffer in self._row_buffers:
            if not rows:
                buffer.clear()
            elif "v" in buffer:
                index = torch.as_tensor(list(rows), dtype=torch.long, device=buffer["v"].device)
                buffer["v"] = buffer["v"].index_select(0, index)[:, drop_columns:buffer["n"]]
                buffer["n"] -= drop_columns

    def park(self) -> List[dict]:
        """Set the histories aside (a new group of rows is prefilled alone); `join` merges them back."""
        parked = [dict(buffer) for buffer in self._row_buffers]
        for buffer in self._row_buffers:
            buffer.clear()
        return parked

    def join(self, parked: List[dict]) -> None:
        """The parked rows, then the rows prefilled since `park`, left-padded to one width."""
        for old, buffer in zip(parked, self._row_buffers):
            if "v" not in old:
                continue
            width = max(old["n"], buffer["n"])
            parts = []
            for part in (old, buffer):
                v = part["v"][:, :part["n"]]
                pad = v.new_zeros((v.shape[0], width - part["n"]) + tuple(v.shape[2:]))
                parts.append(torch.cat([pad, v], dim=1))
            buffer["v"], buffer["n"] = torch.cat(parts, dim=0), width

    def record(self, kind: str, layer: int, q_start: int, **tensors: torch.Tensor) -> None:
        """Keep ``[batch, head, q]`` tensors of one hook call (detached, on device)."""
        self._records.append((kind, layer, q_start, {k: v.detach() for k, v in tensors.items()}))

    def events(self) -> List[InterventionEvent]:
        """Every (row, layer, query) where the intervention acted, in the order the hooks
        ran, rows then queries within one hook call. Consecutive records of one shape (the
        calls between two changes of the batch) are stacked, so the host syncs once per
        recorded quantity and shape and the work is vectorised, not looped per hook call."""
        if not self._records:
            return []
        pad = self.state.pad.cpu()
        step_id = self.state.step_id.cpu()
        out: List[InterventionEvent] = []
        for _, run in itertools.groupby(self._records, key=lambda r: (r[0], tuple(r[3]["fired"].shape))):
            out.extend(self._events_of(list(run), pad, step_id))
        return out

    def _events_of(self, records, pad: torch.Tensor, step_id: torch.Tensor) -> List[InterventionEvent]:
        """The events of records of one kind and shape ``[batch, head, q]``."""
        kind = records[0][0]
        keys = ("lambda_b", "lambda_s", "kl") if kind == "attn" else ("norm",)
        fired = torch.stack([rec["fired"] for _, _, _, rec in records]).cpu() > 0  # [record, batch, head, q]
        n_heads = fired.sum(dim=2)  # [record, batch, q]
        where = (n_heads > 0).nonzero()  # [event, 3]: (record, row, query), in the records' order
        if not where.shape[0]:
            return []
        r, b, q = where.unbind(1)
        heads = fired[r, b, :, q]  # [event, head]
        count = n_heads[r, b, q].double()

        def mean(key: str) -> List[float]:
            """Mean over the heads that fired, of each event: summed in fp64 (so the order
            of the sum does not matter), rounded to fp32 like the recorded values."""
            values = torch.stack([rec[key].float() for _, _, _, rec in records]).cpu()[r, b, :, q].double()
            return (torch.where(heads, values, torch.zeros_like(values)).sum(-1) / count).float().tolist()

        layer = torch.tensor([layer for _, layer, _, _ in records])[r]
        pos = q + torch.tensor([q_start for _, _, q_start, _ in records])[r]
        inside = pos < step_id.shape[1]
        steps = torch.where(inside, step_id[b, pos.clamp_max(step_id.shape[1] - 1)].long(), torch.full_like(pos, -1))
        columns = {"layer": layer.tolist(), "row": b.tolist(), "position": (pos - pad[b]).tolist(),
                   "step": steps.tolist(), "n_heads": count.long().tolist()}
        if kind == "attn":
            columns.update(lambda_b=mean("lambda_b"), lambda_s=mean("lambda_s"), kl=mean("kl"))
        else:
            columns["injected_norm"] = mean("norm")
        names = list(columns)
        return [InterventionEvent(self.name, **dict(zip(names, values))) for values in zip(*columns.values())]

    def take_events(self, rows: Sequence[int]) -> List[InterventionEvent]:
        """`events` with batch row ``b`` reported as ``rows[b]``, then forgets them: called
        by `generate` before rows leave or join the batch (the records' row index and the
        state's padding are those of the batch as it was)."""
        events = [replace(e, row=rows[e.row]) for e in self.events()]
        self._records.clear()
        return events

    def per_query(self, key: str) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Raw records: ``(layer, fired [batch, head, q], values [batch, head, q])``."""
        return [(layer, rec["fired"], rec[key]) for _, layer, _, rec in self._records if key in rec]


# --------------------------------------------------------------------------- base
class Intervention:
    """One interface: `install` builds the hooks for a model and a `StepState`;
    `applied` installs them for the duration of a ``with`` block."""

    name = "intervention"

    def install(self, model: TLModel, state: StepState) -> InterventionRun:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: TLModel, state: StepState) -> Iterator[InterventionRun]:
        """``with oeb.applied(model, state) as run: model(tokens)``; hooks removed on exit."""
        with apply_interventions([self], model, state) as runs:
            yield runs[0]

    def applied_to_trace(self, model: TLModel, trace: Trace, state: Optional[StepState] = None):
        """`applied` for a teacher-forced forward over ``trace.token_ids`` (what
        ``step_saliency(..., interventions=[...])`` enters): ``state`` defaults to
        ``StepState.from_trace(trace)`` on the model's device."""
        if state is None:
            state = StepState.from_trace(trace, device=adapter(model).device)
        if state.n_pos != trace.token_ids.shape[0]:
            raise StepflowError(
                f"the intervention state covers {state.n_pos} positions but the trace has "
                f"{trace.token_ids.shape[0]} tokens; build it with StepState.from_trace(trace)"
            )
        return self.applied(model, state)


@contextlib.contextmanager
def apply_interventions(interventions: Sequence[Intervention], model: TLModel, state: StepState) -> Iterator[List[InterventionRun]]:
    """Install several interventions at once (their hooks compose in list order)."""
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise StepflowError(f"expected an Intervention, got {type(iv).__name__}")
    runs = [iv.install(model, state) for iv in interventions]
    with temporary_hooks(model, [h for run in runs for h in run.hooks]):
        yield runs


class CompositeRun(InterventionRun):
    """The runs of a composite intervention's parts behind one `InterventionRun`: one
    list of hooks (the parts' in order), one ``state`` (set on every part), and the
    parts' events, each still named after the part that acted."""

    def __init__(self, name: str, runs: Sequence[InterventionRun]):
        self.parts = list(runs)
        super().__init__(name, self.parts[0].state)
        self.hooks = [h for run in self.parts for h in run.hooks]

    @property
    def state(self) -> StepState:
        return self._state

    @state.setter
    def state(self, value: StepState) -> None:
        self._state = value
        for run in getattr(self, "parts", ()):
            run.state = value

    def record(self, kind: str, layer: int, q_start: int, **tensors: torch.Tensor) -> None:
        raise StepflowError(f"{self.name} records through its parts")

    def events(self) -> List[InterventionEvent]:
        return [e for run in self.parts for e in run.events()]

    def take_events(self, rows: Sequence[int]) -> List[InterventionEvent]:
        return [e for run in self.parts for e in run.take_events(rows)]

    def keep_rows(self, rows: Sequence[int], drop_columns: int) -> None:
        for run in self.parts:
            run.keep_rows(rows, drop_columns)

    def park(self) -> List[dict]:
        return [run.park() for run in self.parts]

    def join(self, parked: List[dict]) -> None:
        for run, part in zip(self.parts, parked):
            run.join(part)

    def per_query(self, key: str) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
        return [r for run in self.parts for r in run.per_query(key)]


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
