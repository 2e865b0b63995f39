"""Failure metrics on step maps: Shallow Lock-in and Deep Decay (docs/method.md section 3).

The paper names the two failure patterns but publishes no formula for them; the
metrics here are this project's definitions (docs/diagnostics.md).

Input is any object shaped like ``stepflow_tl.saliency.StepSaliency`` (duck-typed):
``maps`` [layer, step_q, step_k] (torch or numpy, non-negative), ``layers`` (model
layer index of each row of ``maps``), ``n_model_layers``, ``step_kinds`` (each of
"question", "thinking", "summary"), and optionally ``step_labels``, ``map_kind``,
``meta``.

Per layer l, with M = maps[l] and the causal row mass r_i = sum_{j <= i} M[i, j]:

- ``lock_in``  LI_l = mean over thinking rows i > 0 of M[i, i] / r_i
- ``question_share``  QT_l = mean over thinking rows of sum_{j in question} M[i, j] / r_i
- ``summary_thinking_share``  DS_l = mean over summary rows s of sum_{j in thinking} M[s, j] / r_s
- ``summary_self`` / ``thinking_self``: mean of the summary x summary / thinking x
  thinking block (``self_block="full"``: every entry, the step-level causal zeros
  included, like ``pool="mean"``; ``"lower"``: only pairs with j <= i)
- ``anomaly_ratio`` = summary_self / thinking_self

Rows with zero mass are left out of the means (never a division warning); a metric
that cannot be defined for a trace is NaN and ``Diagnostics.notes`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import pandas as pd

from ..errors import StepflowError
from ..stats import compare_groups, holm
from ..traces.formats import STEP_KINDS
from ..viz.stepmaps import StepMapResult

__all__ = ["METRICS", "METRIC_LEGEND", "HEADLINE_METRICS", "BANDS", "Diagnostics", "band_layers", "diagnose", "compare"]

METRICS = (
    "lock_in",
    "question_share",
    "summary_thinking_share",
    "summary_self",
    "thinking_self",
    "anomaly_ratio",
)
BANDS = ("shallow", "middle", "deep")
# A band's layers: a fraction of the model's layers (from the bottom or the top) or explicit indices.
BandSpec = Union[float, Sequence[int]]
# One metric, one name: the per-layer column is the metric's name (``lock_in``); LI / QT / DS are
# the symbols of the formulas (docs/method.md); a headline of a trace is a band mean of a metric,
# named by its CSV column (a file format, so the short names stay). Reports print the long form.
HEADLINE_METRICS: dict[str, tuple[str, str]] = {
    "li_shallow": ("lock_in", "shallow mean"),
    "qt_shallow": ("question_share", "shallow mean"),
    "ds_deep": ("summary_thinking_share", "deep mean"),
    "ds_slope_deep": ("summary_thinking_share", "slope over deep layers"),
    "anomaly_deep": ("anomaly_ratio", "deep mean"),
}
HEADLINE_HEADERS: dict[str, str] = {h: f"{m} ({what})" for h, (m, what) in HEADLINE_METRICS.items()}
_SELF_BLOCKS = ("full", "lower")

# Names and formulas of the metrics above, for readers: every report that shows diagnostics
# prints them (through `Diagnostics.legend`), so a reader never has to guess what a curve means.
METRIC_LEGEND: dict[str, str] = {
    "LI (lock_in)": "LI_l = mean over thinking rows i > 0 of M_l[i, i] / r_i, with the causal row mass "
    "r_i = sum_{j <= i} M_l[i, j]  (high in shallow layers = Shallow Lock-in)",
    "QT (question_share)": "QT_l = mean over thinking rows i of sum_{j in question} M_l[i, j] / r_i",
    "DS (summary_thinking_share)": "DS_l = mean over summary rows s of sum_{j in thinking} M_l[s, j] / r_s; "
    "its slope over the deep layers (ds_slope_deep) measures Deep Decay",
    "summary_self / thinking_self": "mean of the summary x summary / thinking x thinking block of M_l",
    "anomaly ratio (anomaly_ratio)": "summary_self / thinking_self (summary self-intensity over "
    "thinking self-intensity)",
    "recency profile": "share of a row's mass at step distance d = i - j",
    "shallow / deep": "bottom quarter / top quarter of the model's layers (li_shallow, qt_shallow, "
    "ds_deep, anomaly_deep: means over those layers)",
}


# --------------------------------------------------------------------------- bands


def _band_size(n_model_layers: int, frac: float, name: str) -> int:
    if not 0.0 < frac < 1.0:
        raise StepflowError(f"{name}: a fraction must be in (0, 1), e.g. 0.25; got {frac}")
    # Round half up (7.5 -> 8 for 30 layers), and always at least one layer.
    return max(1, math.floor(n_model_layers * frac + 0.5))


def _band_list(spec, n_model_layers: int, name: str, *, top: bool) -> list[int]:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        k = _band_size(n_model_layers, float(spec), name)
        return list(range(n_model_layers - k, n_model_layers)) if top else list(range(k))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        layers = sorted({int(v) for v in spec})
        bad = [v for v in layers if not 0 <= v < n_model_layers]
        if bad or not layers:
            raise StepflowError(
                f"{name}: expected a non-empty list of layer indices in [0, {n_model_layers}); got {list(spec)}"
            )
        return layers
    raise StepflowError(f"{name}: expected a fraction in (0, 1) or a list of layer indices; got {spec!r}")


def band_layers(n_model_layers: int, shallow: BandSpec = 0.25, deep: BandSpec = 0.25) -> dict[str, list[int]]:
    """Model layers of each band: {"shallow": [...], "middle": [...], "deep": [...]}.

    ``shallow``/``deep`` are fractions of ``n_model_layers`` (bottom / top; the
    count is rounded half up and at least 1) or explicit lists of layer indices.
    "middle" is every other layer. The two bands must not overlap.
    """
    if isinstance(n_model_layers, bool) or int(n_model_layers) != n_model_layers or n_model_layers < 1:
        raise StepflowError(f"n_model_layers must be a positive integer; got {n_model_layers!r}")
    n = int(n_model_layers)
    sh = _band_list(shallow, n, "shallow", top=False)
    dp = _band_list(deep, n, "deep", top=True)
    overlap = sorted(set(sh) & set(dp))
    if overlap:
        raise StepflowError(
            f"shallow {sh} and deep {dp} bands overlap at layers {overlap} for a {n}-layer model; "
            "pass smaller fractions or explicit, disjoint layer lists"
        )
    taken = set(sh) | set(dp)
    return {"shallow": sh, "middle": [l for l in range(n) if l not in taken], "deep": dp}


# --------------------------------------------------------------------------- helpers


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the finite entries along ``axis``; NaN where there are none (no warning)."""
    ok = np.isfinite(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return _safe_div(total, count.astype(np.float64))


def _finite_mean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _maps_array(result) -> np.ndarray:
    maps = getattr(result, "maps", None)
    if maps is None:
        raise StepflowError(
            f"expected a StepSaliency-like result with .maps [layer, step_q, step_k]; got {type(result).__name__}"
        )
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().double().numpy()
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise StepflowError(f"maps must have shape [layer, step_q, step_k] with step_q == step_k; got {arr.shape}")
    if not np.isfinite(arr).all():
        raise StepflowError("maps contain NaN or inf; the saliency computation upstream failed")
    if (arr < 0).any():
        raise StepflowError("maps must be non-negative (saliency magnitudes or attention probabilities)")
    return arr


def _recency_labels(max_distance: int) -> list[str]:
    return [str(d) for d in range(max_distance)] + [f"{max_distance}+"]


# --------------------------------------------------------------------------- result


@dataclass(eq=False)
class Diagnostics:
    """Failure metrics of one trace.

    Attributes:
        per_layer: one row per analysed layer: layer, band, and the METRICS columns.
        recency_layers: long table (layer, band, rows in {"thinking", "summary"},
            distance, label, share): mean share of a row's mass at step distance
            d = i - j; the last bucket (label "K+") holds all d >= K.
        bands: model layers of each band (see :func:`band_layers`).
        n_model_layers: layers in the model (bands are defined on these).
        n_steps: number of question / thinking / summary steps.
        li_shallow, qt_shallow: mean LI / QT over the shallow layers present.
        ds_deep, anomaly_deep: mean DS / anomaly ratio over the deep layers present.
        ds_slope_deep: least-squares slope of DS against the model layer index over
            the deep layers (per layer; negative = thinking share decays with depth).
        notes: metric (or "rows") -> why it is NaN or what was left out.
        map_kind, meta: copied from the input.
    """

    per_layer: pd.DataFrame
    recency_layers: pd.DataFrame
    bands: dict[str, list[int]]
    n_model_layers: int
    n_steps: dict[str, int]
    li_shallow: float
    qt_shallow: float
    ds_deep: float
    ds_slope_deep: float
    anomaly_deep: float
    notes: dict[str, str] = field(default_factory=dict)
    map_kind: str = "saliency"
    meta: dict = field(default_factory=dict)

    HEADLINES = tuple(HEADLINE_METRICS)

    @property
    def layers(self) -> list[int]:
        return [int(v) for v in self.per_layer["layer"]]

    @property
    def legend(self) -> dict[str, str]:
        """{metric: definition} of every metric here (`METRIC_LEGEND`), for a report's legend."""
        return dict(METRIC_LEGEND)

    def to_dataframe(self) -> pd.DataFrame:
        """Per-layer metrics (a copy): layer, band, and one column per metric."""
        return self.per_layer.copy()

    def band_means(self) -> pd.DataFrame:
        """Mean of each metric over the layers of each band present: index band, columns METRICS."""
        rows = {}
        for band in BANDS:
            sub = self.per_layer[self.per_layer["band"] == band]
            rows[band] = {m: _finite_mean(sub[m]) for m in METRICS}
        return pd.DataFrame.from_dict(rows, orient="index").reindex(columns=list(METRICS))

    @property
    def recency(self) -> pd.DataFrame:
        """Recency profile per band: mean over the band's layers of ``recency_layers``."""
        if self.recency_layers.empty:
            return self.recency_layers.drop(columns=["layer"])
        out = (
            self.recency_layers.groupby(["band", "rows", "distance", "label"], sort=False)["share"]
            .apply(_finite_mean)
            .reset_index()
        )
        out["band"] = pd.Categorical(out["band"], categories=list(BANDS), ordered=True)
        return out.sort_values(["band", "rows", "distance"], kind="stable").reset_index(drop=True)

    def summary(self, *, include_meta: bool = True) -> dict:
        """Headline numbers of the trace as a flat dict (one row of a study table).

        Keys: the HEADLINES, n_question/n_thinking/n_summary, n_layers, map_kind, and
        (``include_meta``) the scalar entries of ``meta`` that do not clash.
        """
        out: dict = {h: getattr(self, h) for h in self.HEADLINES}
        out.update({f"n_{k}": v for k, v in self.n_steps.items()})
        out["n_layers"] = len(self.per_layer)
        out["map_kind"] = self.map_kind
        if include_meta:
            for k, v in self.meta.items():
                if k not in out and (v is None or isinstance(v, (str, int, float, bool))):
                    out[k] = v
        return out

    def _text(self) -> str:
        trace = self.meta.get("trace_id", self.meta.get("id"))
        head = (
            f"Diagnostics({self.map_kind}"
            + (f", trace={trace}" if trace is not None else "")
            + f", steps q/t/s={self.n_steps['question']}/{self.n_steps['thinking']}/{self.n_steps['summary']}"
            + f", layers {len(self.per_layer)}/{self.n_model_layers})"
        )
        bands = "  bands: " + ", ".join(
            f"{b} {v[0]}-{v[-1]}" if v else f"{b} none" for b, v in self.bands.items()
        )
        heads = "  " + "  ".join(f"{h}={getattr(self, h):.4g}" for h in self.HEADLINES)
        table = self.per_layer.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        lines = [head, bands, heads, table]
        if self.notes:
            lines.append("  notes:")
            lines.extend(f"    {k}: {v}" for k, v in self.notes.items())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._text()

    def show(self) -> None:
        """Print the headline numbers, the per-layer table and the notes."""
        print(self._text())


# --------------------------------------------------------------------------- diagnose


def diagnose(
    result: StepMapResult,
    *,
    shallow: BandSpec = 0.25,
    deep: BandSpec = 0.25,
    self_block: str = "full",
    recency_max: int = 4,
) -> Diagnostics:
    """Compute the failure metrics of one StepSaliency-like result.

    Args:
        result: object with ``maps`` [layer, step_q, step_k], ``layers``,
            ``n_model_layers``, ``step_kinds`` (see module docstring).
        shallow, deep: band fractions of the model's layers or explicit layer lists.
        self_block: "full" (block mean incl. step-level causal zeros, consistent with
            ``pool="mean"``) or "lower" (mean over pairs j <= i only) for
            summary_self / thinking_self.
        recency_max: K; recency distances 0..K-1 get their own bucket, the rest "K+".
    """
    if self_block not in _SELF_BLOCKS:
        raise StepflowError(f"self_block must be one of {_SELF_BLOCKS}; got {self_block!r}")
    if isinstance(recency_max, bool) or int(recency_max) != recency_max or recency_max < 1:
        raise StepflowError(f"recency_max must be a positive integer; got {recency_max!r}")
    recency_max = int(recency_max)
    maps = _maps_array(result)
    n_l, n_s, _ = maps.shape
    kinds = list(getattr(result, "step_kinds", None) or [])
    if len(kinds) != n_s:
        raise StepflowError(f"step_kinds has {len(kinds)} entries but maps have {n_s} steps")
    unknown = sorted(set(kinds) - set(STEP_KINDS))
    if unknown:
        raise StepflowError(f"step_kinds must be in {STEP_KINDS}; got {unknown}")
    layers = [int(v) for v in getattr(result, "layers", [])]
    if len(layers) != n_l:
        raise StepflowError(f"layers has {len(layers)} entries but maps have {n_l} layer rows")
    if len(set(layers)) != n_l:
        raise StepflowError(f"layers must be distinct; got {layers}")
    n_model = getattr(result, "n_model_layers", None)
    if n_model is None:
        raise StepflowError("result has no n_model_layers; bands are defined on the model's layer count")
    bands = band_layers(n_model, shallow, deep)
    n_model = int(n_model)
    out_of_range = [l for l in layers if not 0 <= l < n_model]
    if out_of_range:
        raise StepflowError(f"layers {out_of_range} are outside the model's [0, {n_model})")
    band_of = {l: b for b, ls in bands.items() for l in ls}

    kinds_arr = np.array(kinds)
    q_idx = np.flatnonzero(kinds_arr == "question")
    t_idx = np.flatnonzero(kinds_arr == "thinking")
    s_idx = np.flatnonzero(kinds_arr == "summary")
    notes: dict[str, str] = {}

    lower = np.tril(maps)  # [layer, step_q, step_k]; keys after the query carry no mass causally
    row_mass = lower.sum(axis=-1)  # [layer, step_q]
    nan_layers = np.full(n_l, np.nan)

    # Shallow Lock-in: self share of thinking rows that have some earlier step.
    li_rows = t_idx[t_idx > 0]
    if li_rows.size:
        li = _nanmean(_safe_div(maps[:, li_rows, li_rows], row_mass[:, li_rows]), axis=1)
    else:
        li = nan_layers
        notes["lock_in"] = "no thinking step with an earlier step to attend to"

    if t_idx.size and q_idx.size:
        q_mass = lower[:, t_idx][:, :, q_idx].sum(axis=-1)  # [layer, thinking row]
        qt = _nanmean(_safe_div(q_mass, row_mass[:, t_idx]), axis=1)
    else:
        qt = nan_layers
        notes["question_share"] = "no thinking step" if not t_idx.size else "no question step"

    if s_idx.size and t_idx.size:
        t_mass = lower[:, s_idx][:, :, t_idx].sum(axis=-1)  # [layer, summary row]
        ds = _nanmean(_safe_div(t_mass, row_mass[:, s_idx]), axis=1)
    else:
        ds = nan_layers
        notes["summary_thinking_share"] = "no summary step" if not s_idx.size else "no thinking step"

    def block_mean(idx: np.ndarray) -> np.ndarray:
        block = maps[:, idx][:, :, idx]  # [layer, k, k]
        if self_block == "full":
            return block.mean(axis=(1, 2))
        keep = np.tril(np.ones((idx.size, idx.size), dtype=bool))
        return block[:, keep].mean(axis=1)

    summary_self = block_mean(s_idx) if s_idx.size else nan_layers
    thinking_self = block_mean(t_idx) if t_idx.size else nan_layers
    if not s_idx.size:
        notes["summary_self"] = "no summary step"
    if not t_idx.size:
        notes["thinking_self"] = "no thinking step"
    anomaly = _safe_div(summary_self, thinking_self)
    if not (s_idx.size and t_idx.size):
        notes["anomaly_ratio"] = "needs both summary and thinking steps"
    elif np.isnan(anomaly).any():
        zero = [layers[i] for i in np.flatnonzero(np.isnan(anomaly))]
        notes["anomaly_ratio"] = f"thinking self-intensity is 0 at layers {zero}"

    analysed = np.concatenate([t_idx, s_idx])
    if analysed.size:
        empty = row_mass[:, analysed] <= 0
        if empty.any():
            notes["rows"] = (
                f"{int(empty.sum())} thinking/summary rows (over {int(empty.any(axis=1).sum())} layers) "
                "have zero mass and were left out of the row means"
            )

    per_layer = pd.DataFrame(
        {
            "layer": layers,
            "band": [band_of[l] for l in layers],
            "lock_in": li,
            "question_share": qt,
            "summary_thinking_share": ds,
            "summary_self": summary_self,
            "thinking_self": thinking_self,
            "anomaly_ratio": anomaly,
        }
    ).sort_values("layer", kind="stable").reset_index(drop=True)

    recency = _recency(lower, row_mass, layers, band_of, {"thinking": t_idx, "summary": s_idx}, recency_max)

    present = {b: per_layer[per_layer["band"] == b] for b in BANDS}
    for b in ("shallow", "deep"):
        if present[b].empty:
            notes[f"{b}_band"] = f"none of the {b} layers {bands[b]} is in the result's layers"
    deep = present["deep"]
    ds_slope = _slope(deep["layer"].to_numpy(), deep["summary_thinking_share"].to_numpy())
    if math.isnan(ds_slope) and "summary_thinking_share" not in notes:
        notes["ds_slope_deep"] = "needs DS at 2 or more deep layers"

    return Diagnostics(
        per_layer=per_layer,
        recency_layers=recency,
        bands=bands,
        n_model_layers=n_model,
        n_steps={"question": int(q_idx.size), "thinking": int(t_idx.size), "summary": int(s_idx.size)},
        li_shallow=_finite_mean(present["shallow"]["lock_in"]),
        qt_shallow=_finite_mean(present["shallow"]["question_share"]),
        ds_deep=_finite_mean(deep["summary_thinking_share"]),
        ds_slope_deep=ds_slope,
        anomaly_deep=_finite_mean(deep["anomaly_ratio"]),
        notes=notes,
        map_kind=str(getattr(result, "map_kind", "saliency")),
        meta=dict(getattr(result, "meta", None) or {}),
    )


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(y)
    x, y = x[ok].astype(np.float64), y[ok]
    if x.size < 2:
        return math.nan
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _recency(lower, row_mass, layers, band_of, row_sets, recency_max) -> pd.DataFrame:
    """Mean share of row mass by step distance d = i - j, per layer and row kind.

    Each row's shares over the buckets 0..K-1, "K+" sum to 1 (a row i < d simply has
    no mass at distance d), so each averaged profile sums to 1 as well.
    """
    n_s = lower.shape[1]
    dist = np.arange(n_s)[:, None] - np.arange(n_s)[None, :]  # [step_q, step_k]
    bucket = np.clip(dist, 0, recency_max)
    labels = _recency_labels(recency_max)
    frames = []
    for rows_name, idx in row_sets.items():
        if not idx.size:
            continue
        # [layer, row, bucket]: mass of each row in each distance bucket (j <= i only).
        mass = np.zeros((lower.shape[0], idx.size, recency_max + 1))
        for b in range(recency_max + 1):
            sel = (bucket[idx] == b) & (dist[idx] >= 0)  # [row, step_k]
            mass[:, :, b] = (lower[:, idx] * sel[None]).sum(axis=-1)
        share = _nanmean(_safe_div(mass, row_mass[:, idx, None]), axis=1)  # [layer, bucket]
        for li, layer in enumerate(layers):
            for b in range(recency_max + 1):
                frames.append((layer, band_of[layer], rows_name, b, labels[b], share[li, b]))
    cols = ["layer", "band", "rows", "distance", "label", "share"]
    return pd.DataFrame(frames, columns=cols).sort_values(["layer", "rows", "distance"], kind="stable")\
        .reset_index(drop=True)


# --------------------------------------------------------------------------- compare


def _as_diagnostics(items, name: str, diagnose_kwargs: dict) -> list[Diagnostics]:
    if isinstance(items, (Diagnostics, str)) or not isinstance(items, Sequence):
        raise StepflowError(f"{name}: expected a list of StepSaliency results or Diagnostics; got {type(items).__name__}")
    return [d if isinstance(d, Diagnostics) else diagnose(d, **diagnose_kwargs) for d in items]


def compare(
    group_a: Sequence[Union[StepMapResult, Diagnostics]],
    group_b: Sequence[Union[StepMapResult, Diagnostics]],
    *,
    test: str = "mannwhitney",
    labels: tuple[str, str] = ("correct", "incorrect"),
    metrics: Sequence[str] = METRICS,
    **diagnose_kwargs: Any,
) -> pd.DataFrame:
    """Compare the metrics of two groups of traces, per layer and per band.

    Args:
        group_a, group_b: lists of StepSaliency-like results or :class:`Diagnostics`
            (results are passed through :func:`diagnose` with ``diagnose_kwargs``).
        test: "mannwhitney" (effect: Cliff's delta) or "welch" (effect: Hedges' g);
            see :func:`stepflow_tl.stats.compare_groups`. Positive effect = group_a larger.
        labels: names of the two groups, used in the n_/mean_ column names.
        metrics: subset of METRICS to test.

    Returns:
        DataFrame with one row per test: level ("layer" or "band"), metric, band,
        layer (NA for band rows), test, effect_name, effect, statistic, p, p_holm,
        n_<a>, n_<b>, mean_<a>, mean_<b>, reason. Band rows compare each trace's mean
        over the band's layers; the extra metric "ds_slope" (band "deep") compares
        ``ds_slope_deep``. Holm's adjustment runs within each (level, metric)
        family: across layers for layer rows, across bands for band rows.
    """
    if len(labels) != 2 or labels[0] == labels[1]:
        raise StepflowError(f"labels must be two distinct names; got {labels!r}")
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise StepflowError(f"metrics must be a non-empty subset of {METRICS}; got {list(metrics)}")
    a = _as_diagnostics(group_a, "group_a", diagnose_kwargs)
    b = _as_diagnostics(group_b, "group_b", diagnose_kwargs)
    everyone = a + b
    if not everyone:
        raise StepflowError("both groups are empty; expected at least one trace")
    n_models = {d.n_model_layers for d in everyone}
    band_sets = {tuple((k, tuple(v)) for k, v in d.bands.items()) for d in everyone}
    if len(n_models) > 1 or len(band_sets) > 1:
        raise StepflowError(
            "all traces must come from the same model and use the same bands; got n_model_layers "
            f"{sorted(n_models)} and {len(band_sets)} different band definitions"
        )
    bands = everyone[0].bands
    band_of = {l: bnd for bnd, ls in bands.items() for l in ls}
    la, lb = labels

    def row(level, metric, band, layer, x, y) -> dict:
        res = compare_groups(x, y, test=test)
        return {
            "level": level, "metric": metric, "band": band, "layer": layer, "test": test,
            "effect_name": res.effect_name, "effect": res.effect, "statistic": res.statistic, "p": res.p,
            f"n_{la}": res.n_x, f"n_{lb}": res.n_y, f"mean_{la}": res.mean_x, f"mean_{lb}": res.mean_y,
            "reason": res.reason,
        }

    def stacked(group) -> pd.DataFrame:
        frames = [d.per_layer for d in group]
        return pd.concat(frames, ignore_index=True) if frames else everyone[0].per_layer.iloc[:0]

    table_a, table_b = stacked(a), stacked(b)
    rows = []
    all_layers = sorted({l for d in everyone for l in d.layers})
    for metric in metrics:
        for layer in all_layers:
            x = table_a.loc[table_a["layer"] == layer, metric].to_numpy(dtype=np.float64)
            y = table_b.loc[table_b["layer"] == layer, metric].to_numpy(dtype=np.float64)
            rows.append(row("layer", metric, band_of[layer], layer, x, y))
    means_a = [d.band_means() for d in a]
    means_b = [d.band_means() for d in b]
    for metric in metrics:
        for band in BANDS:
            rows.append(row(
                "band", metric, band, pd.NA,
                [m.loc[band, metric] for m in means_a], [m.loc[band, metric] for m in means_b],
            ))
    rows.append(row("band", "ds_slope", "deep", pd.NA, [d.ds_slope_deep for d in a], [d.ds_slope_deep for d in b]))

    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["level", "metric"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p"].to_numpy(dtype=np.float64))
    cols = ["level", "metric", "band", "layer", "test", "effect_name", "effect", "statistic", "p", "p_holm",
            f"n_{la}", f"n_{lb}", f"mean_{la}", f"mean_{lb}", "reason"]
    return df[cols]


# The authors' split of problems by how often the model solves them.
HIGH_ACCURACY, LOW_ACCURACY = 0.7, 0.3


def compare_by_accuracy(
    results: Sequence[Union[StepMapResult, Diagnostics]],
    accuracy: Sequence[float],
    *,
    high: float = HIGH_ACCURACY,
    low: float = LOW_ACCURACY,
    **compare_kwargs: Any,
) -> pd.DataFrame:
    """`compare` of the traces of high-accuracy problems (accuracy >= ``high``) against
    those of low-accuracy ones (<= ``low``), the authors' second comparison beside
    correct vs incorrect. ``accuracy[i]``: the share of samples of trace i's problem that
    were correct (e.g. from a study's items); traces in between are left out. Columns
    as `compare`, with the groups named ``high_accuracy`` and ``low_accuracy``."""
    results, accuracy = list(results), [float(a) for a in accuracy]
    if len(results) != len(accuracy):
        raise StepflowError(f"got {len(accuracy)} accuracies for {len(results)} traces; pass one per trace")
    if not 0.0 <= low < high <= 1.0:
        raise StepflowError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    if any(not 0.0 <= a <= 1.0 for a in accuracy):
        raise StepflowError("accuracies must lie in [0, 1]")
    group_high = [r for r, a in zip(results, accuracy) if a >= high]
    group_low = [r for r, a in zip(results, accuracy) if a <= low]
    return compare(group_high, group_low, labels=("high_accuracy", "low_accuracy"), **compare_kwargs)
