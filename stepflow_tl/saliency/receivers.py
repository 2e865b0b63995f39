"""Receiver heads at step level (Thought Anchors, Bogdan et al. 2025): heads whose
attention is concentrated on a few "broadcasting" steps that every later step reads.

For one head, ``M[i, j]`` is the mean attention from the tokens of step ``i`` to those of
step ``j`` (`step_attention(..., pool="mean", per_head=True)`, their sentence-averaged
matrix). The **vertical score** of step ``j`` is the mean of ``M[i, j]`` over the later
steps ``i >= j + k`` (the nearest ``k - 1`` steps and the step itself are ignored, as
their ``proximity_ignore``); the last ``k`` steps have none and get NaN. A head's
**kurtosis** is the Fisher kurtosis (biased, NaN omitted; ``scipy.stats.kurtosis``) of
its vertical scores over steps: high where a few steps receive most. Heads ranked by it
are the receiver heads; the **receiver score** of a step is its vertical score averaged
over the top heads. This module follows their ``receiver_head_funcs.py`` /
``attn_funcs.get_vertical_scores`` (``control_depth=False``, ``score_type="mean"``) and
copies no code.

Grouped-query attention: every query head is reported (``head``) with its key/value
group (``kv_group = head // (n_heads / n_kv_heads)``, as ``repeat_kv``), and `groups`
pools each group: the mean vertical score of its query heads, then its kurtosis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import StepflowError
from ..tl.adapter import TLModel, adapter
from ..traces.trace import Trace
from .compute import step_attention
from .maps import StepSaliency

# Thought Anchors' default in the receiver-head functions; 20 top heads in their ranking.
PROXIMITY_IGNORE = 4
TOP_K = 20


def vertical_scores(maps: np.ndarray, proximity_ignore: int = PROXIMITY_IGNORE) -> np.ndarray:
    """``[..., step, step]`` (query, key) -> ``[..., step]``: for key step ``j`` the mean of
    ``maps[..., i, j]`` over ``i >= j + proximity_ignore``; NaN where no such ``i``."""
    maps = np.asarray(maps, dtype=np.float64)
    n = maps.shape[-1]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    later = (i - j) >= proximity_ignore  # [query, key]
    counts = later.sum(0)
    sums = (maps * later).sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def kurtosis(scores: np.ndarray) -> np.ndarray:
    """Fisher kurtosis over the last axis, biased, NaN omitted (Thought Anchors' choice)."""
    return np.asarray(stats.kurtosis(scores, axis=-1, fisher=True, bias=True, nan_policy="omit"), dtype=np.float64)


@dataclass
class ReceiverHeads:
    """Receiver-head analysis of one trace.

    Attributes:
        vertical: ``[layer, head, step]`` vertical scores (NaN for the last
            ``proximity_ignore`` steps).
        kurtosis: ``[layer, head]``.
        layers: model layer of each row; steps: trace step index of each column.
        step_kinds, step_labels: of those steps.
        n_kv_heads: key/value heads (query heads share them in groups).
        proximity_ignore: ``k`` above.
        meta: JSON-safe details.
    """

    vertical: np.ndarray
    kurtosis: np.ndarray
    layers: List[int]
    steps: List[int]
    step_kinds: List[str]
    step_labels: List[str]
    n_kv_heads: int
    proximity_ignore: int = PROXIMITY_IGNORE
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return self.vertical.shape[1]

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def ranked(self) -> pd.DataFrame:
        """Every (layer, query head), highest kurtosis first: layer, head, kv_group,
        kurtosis, rank (1 = strongest receiver); heads with NaN kurtosis last."""
        layer_idx, head_idx = np.meshgrid(np.arange(len(self.layers)), np.arange(self.n_heads), indexing="ij")
        frame = pd.DataFrame({
            "layer": np.asarray(self.layers)[layer_idx.ravel()],
            "head": head_idx.ravel(),
            "kv_group": head_idx.ravel() // self.group_size,
            "kurtosis": self.kurtosis.ravel(),
        })
        frame = frame.sort_values("kurtosis", ascending=False, na_position="last", kind="stable")
        frame["rank"] = np.arange(1, len(frame) + 1)
        return frame.reset_index(drop=True)

    def groups(self) -> pd.DataFrame:
        """Per (layer, kv_group), pooled: the mean vertical score of the group's query
        heads, its kurtosis, ranked as `ranked`."""
        n_layers = len(self.layers)
        pooled = self.vertical.reshape(n_layers, self.n_kv_heads, self.group_size, -1).mean(2)
        kurt = kurtosis(pooled)
        layer_idx, group_idx = np.meshgrid(np.arange(n_layers), np.arange(self.n_kv_heads), indexing="ij")
        frame = pd.DataFrame({"layer": np.asarray(self.layers)[layer_idx.ravel()], "kv_group": group_idx.ravel(),
                              "kurtosis": kurt.ravel()})
        frame = frame.sort_values("kurtosis", ascending=False, na_position="last", kind="stable")
        frame["rank"] = np.arange(1, len(frame) + 1)
        return frame.reset_index(drop=True)

    def top_heads(self, top_k: int = TOP_K) -> List[tuple]:
        """The ``(layer, head)`` of the ``top_k`` highest-kurtosis heads (NaN excluded)."""
        ranked = self.ranked().dropna(subset=["kurtosis"])
        return [(int(l), int(h)) for l, h in zip(ranked["layer"][:top_k], ranked["head"][:top_k])]

    def step_scores(self, top_k: int = TOP_K, heads: Optional[Sequence[tuple]] = None) -> np.ndarray:
        """``[step]`` receiver score: the mean vertical score over ``heads`` (default this
        trace's `top_heads`; pass heads ranked over many traces to score a new one)."""
        heads = self.top_heads(top_k) if heads is None else list(heads)
        if not heads:
            raise StepflowError("no head has a kurtosis (too few steps for proximity_ignore); lower it")
        rows = [self.vertical[self.layers.index(l), h] for l, h in heads]
        return np.mean(rows, axis=0)

    def to_dataframe(self, top_k: int = TOP_K) -> pd.DataFrame:
        """Per step: step, kind, label, receiver score (top ``top_k`` heads)."""
        return pd.DataFrame({"step": self.steps, "kind": self.step_kinds, "label": self.step_labels,
                             "receiver_score": self.step_scores(top_k)})


def receiver_heads(
    model_or_attention: Any,
    trace: Optional[Trace] = None,
    *,
    proximity_ignore: int = PROXIMITY_IGNORE,
    kinds: Optional[Sequence[str]] = ("thinking", "summary"),
    layers: Optional[Sequence[int]] = None,
    n_kv_heads: Optional[int] = None,
) -> ReceiverHeads:
    """Vertical scores and kurtosis of every head over the steps of one trace.

    Args:
        model_or_attention: a model (one forward of ``trace`` is run, no gradient) or a
            `StepSaliency` from ``step_attention(..., pool="mean", per_head=True)``.
        trace: the trace (needed with a model).
        proximity_ignore: ``k``: a step's score averages the steps ``k`` or more after it.
        kinds: the step kinds kept, in trace order (default the response, thinking and
            summary, as Thought Anchors' sentences are the response's; None: all steps).
        layers: model layers (default all).
        n_kv_heads: key/value heads of the model (with a model: read from it; else
            default one per query head).
    """
    if isinstance(proximity_ignore, bool) or not isinstance(proximity_ignore, int) or proximity_ignore < 1:
        raise StepflowError(f"proximity_ignore must be an integer >= 1, got {proximity_ignore!r}")
    if isinstance(model_or_attention, StepSaliency):
        attention = model_or_attention
        if attention.head_maps is None or attention.map_kind != "attention" or attention.pool != "mean":
            raise StepflowError("receiver heads need step_attention(model, trace, pool='mean', per_head=True)")
    else:
        if trace is None:
            raise StepflowError("receiver_heads(model, trace): the trace is missing")
        model: TLModel = model_or_attention
        attention = step_attention(model, trace, pool="mean", per_head=True, layers=layers)
        n_kv_heads = adapter(model).n_kv_heads
    head_maps = attention.head_maps.numpy()
    n_heads = head_maps.shape[1]
    n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise StepflowError(f"{n_heads} query heads do not split into n_kv_heads={n_kv_heads} groups")
    steps = [i for i, kind in enumerate(attention.step_kinds) if kinds is None or kind in kinds]
    if len(steps) <= proximity_ignore + 1:
        raise StepflowError(f"{len(steps)} steps of kinds {kinds} leave fewer than two vertical scores with "
                            f"proximity_ignore={proximity_ignore}; use a longer trace or a smaller proximity_ignore")
    sub = head_maps[:, :, steps][:, :, :, steps]
    vertical = vertical_scores(sub, proximity_ignore)
    return ReceiverHeads(
        vertical=vertical, kurtosis=kurtosis(vertical), layers=list(attention.layers), steps=steps,
        step_kinds=[attention.step_kinds[i] for i in steps], step_labels=[attention.step_labels[i] for i in steps],
        n_kv_heads=n_kv_heads, proximity_ignore=proximity_ignore, meta=dict(attention.meta),
    )


def mean_kurtosis(results: Sequence[ReceiverHeads]) -> pd.DataFrame:
    """Heads ranked by their kurtosis averaged over traces (how Thought Anchors picks
    receiver heads across a data set): layer, head, kv_group, kurtosis, rank."""
    if not results:
        raise StepflowError("mean_kurtosis needs at least one ReceiverHeads")
    first = results[0]
    if any(r.kurtosis.shape != first.kurtosis.shape or r.layers != first.layers for r in results):
        raise StepflowError("the ReceiverHeads come from different models or layer sets")
    merged = ReceiverHeads(vertical=first.vertical, kurtosis=np.nanmean([r.kurtosis for r in results], axis=0),
                           layers=first.layers, steps=first.steps, step_kinds=first.step_kinds,
                           step_labels=first.step_labels, n_kv_heads=first.n_kv_heads)
    return merged.ranked()
