"""Rendering: step maps in circuitsvis, matplotlib figures, and a self-contained HTML report.

Nothing here imports the analysis modules: functions take plain arrays and labels, or any
object shaped like a ``StepSaliency`` result (``.maps`` [layer, step_q, step_k], ``.layers``,
``.step_kinds``, ``.step_labels``, ``.map_kind``, ``.pool``, ``.loss``, ``.meta``).

The saved page loads nothing from the network: the circuitsvis JavaScript bundle that ships in
the installed ``circuitsvis`` wheel is inlined once per page, figures are base64 PNGs, and a
Content-Security-Policy allows only the page's own scripts (by hash) and ``data:`` images.
Every piece of trace or model text is HTML-escaped, and the JSON handed to circuitsvis has
``<``, ``>`` and ``&`` escaped so a step label cannot close the ``<script>`` element.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import StepflowError

__all__ = [
    "METRIC_LEGEND",
    "Report",
    "StepMapData",
    "circuitsvis_bundle",
    "plot_accuracy_by_difficulty",
    "plot_group_bands",
    "plot_metric_curves",
    "plot_step_map",
    "save_result_html",
    "step_axis_labels",
    "step_map_data",
]

# Names and formulas of the diagnostics (docs/METHOD.md section 3); every report that shows
# diagnostics repeats them, so a reader never has to guess what a curve means.
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

MAP_KIND_TEXT = {
    "saliency": "Step-Saliency: I_l[t, k] = (1/H) sum_h |A_lh[t, k] * dL/dA_lh[t, k]|, "
    "pooled over the tokens of step i (rows, queries) and step j (columns, keys)",
    "attention": "attention probabilities A_l[t, k] averaged over heads, "
    "pooled over the tokens of step i (rows, queries) and step j (columns, keys)",
}
POOL_TEXT = {
    "mean": "mean over the whole token block, causally masked zeros included (the paper's choice)",
    "causal_mean": "mean over token pairs with key position <= query position only",
}

_KIND_PREFIX = {"question": "Q", "thinking": "T", "summary": "S"}
_LABEL_CHARS = 28
_VALUE_DECIMALS = 4


# ----------------------------------------------------------------------------- step map data


@dataclass(frozen=True)
class StepMapData:
    """Validated step maps ready to draw.

    maps: float64 ndarray [layer, step_q, step_k]; layers: model layer index of each row;
    labels: one unique display label per step; kinds: step kind per step (or None);
    map_kind / pool / loss: provenance strings ("" when unknown); meta: JSON-safe dict.
    """

    maps: np.ndarray
    layers: list[int]
    labels: list[str]
    kinds: list[str] | None
    map_kind: str
    pool: str
    loss: str
    meta: dict

    @property
    def n_steps(self) -> int:
        return self.maps.shape[1]

    @property
    def global_max(self) -> float:
        """Largest absolute value over all layers: the one colour-scale maximum."""
        return float(np.abs(self.maps).max()) if self.maps.size else 0.0


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StepflowError(f"{what} must be a numeric array or tensor, got {type(x).__name__}") from exc
    return arr


def step_axis_labels(
    labels: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    n_steps: int | None = None,
    max_chars: int = _LABEL_CHARS,
) -> list[str]:
    """Short, unique axis labels for steps.

    Uses ``labels`` when given (e.g. a Trace's "T3: First, compute the"), else "Q0"/"T1"/"S7"
    from ``kinds``, else "step 0", ... Long labels are cut to ``max_chars``. Duplicates get a
    "#index" suffix because circuitsvis keys its axis categories by label text.
    """
    if labels is None and kinds is None and n_steps is None:
        raise StepflowError("step_axis_labels needs labels, kinds or n_steps")
    n = len(labels) if labels is not None else len(kinds) if kinds is not None else int(n_steps)
    if kinds is not None and len(kinds) != n:
        raise StepflowError(f"expected {n} step kinds (one per step), got {len(kinds)}")
    out = []
    for i in range(n):
        if labels is not None:
            text = " ".join(str(labels[i]).split())
        elif kinds is not None:
            text = f"{_KIND_PREFIX.get(kinds[i], '?')}{i}"
        else:
            text = f"step {i}"
        if len(text) > max_chars:
            text = text[: max_chars - 1].rstrip() + "\u2026"
        out.append(text)
    seen: dict[str, int] = {}
    for t in out:
        seen[t] = seen.get(t, 0) + 1
    return [f"{t} #{i}" if seen[t] > 1 else t for i, t in enumerate(out)]


def step_map_data(
    result_or_maps: Any,
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    map_kind: str = "",
    pool: str = "",
    loss: str = "",
    meta: Mapping | None = None,
) -> StepMapData:
    """Validate step maps from a StepSaliency-like result or from a plain array.

    result_or_maps: an object with ``.maps`` [layer, step_q, step_k] (and optionally
    ``.layers``, ``.step_kinds``, ``.step_labels``, ``.map_kind``, ``.pool``, ``.loss``,
    ``.meta``), or an array/tensor [layer, step_q, step_k] or [step_q, step_k]. Explicit
    keyword arguments override the result's attributes.
    """
    if isinstance(result_or_maps, StepMapData) and labels is None and layers is None and kinds is None:
        return result_or_maps
    if hasattr(result_or_maps, "maps"):
        r = result_or_maps
        raw = r.maps
        labels = labels if labels is not None else getattr(r, "step_labels", getattr(r, "labels", None))
        kinds = kinds if kinds is not None else getattr(r, "step_kinds", getattr(r, "kinds", None))
        layers = layers if layers is not None else getattr(r, "layers", None)
        map_kind = map_kind or str(getattr(r, "map_kind", "") or "")
        pool = pool or str(getattr(r, "pool", "") or "")
        loss = loss or str(getattr(r, "loss", "") or "")
        meta = meta if meta is not None else (getattr(r, "meta", None) or {})
    else:
        raw = result_or_maps
    maps = _to_numpy(raw, "step maps")
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise StepflowError(
            f"step maps must have shape [layer, step_q, step_k] with step_q == step_k, got {tuple(maps.shape)}"
        )
    if maps.shape[0] == 0 or maps.shape[1] == 0:
        raise StepflowError(f"step maps are empty: shape {tuple(maps.shape)}")
    if not np.isfinite(maps).all():
        raise StepflowError("step maps contain NaN or infinite values; refusing to draw wrong colours")
    n_layers, n_steps = maps.shape[0], maps.shape[1]
    if labels is not None and len(labels) != n_steps:
        raise StepflowError(f"expected {n_steps} step labels (one per map row), got {len(labels)}")
    if kinds is not None and len(kinds) != n_steps:
        raise StepflowError(f"expected {n_steps} step kinds (one per map row), got {len(kinds)}")
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(layers) != n_layers:
        raise StepflowError(f"expected {n_layers} layer indices (one per map), got {len(layers)}")
    if map_kind and map_kind not in MAP_KIND_TEXT:
        raise StepflowError(f"map_kind must be one of {sorted(MAP_KIND_TEXT)}, got {map_kind!r}")
    return StepMapData(
        maps=maps,
        layers=layers,
        labels=step_axis_labels(labels, kinds, n_steps),
        kinds=list(kinds) if kinds is not None else None,
        map_kind=map_kind,
        pool=pool,
        loss=loss,
        meta=dict(meta or {}),
    )


# ----------------------------------------------------------------------------- circuitsvis


def circuitsvis_bundle() -> str:
    """The circuitsvis browser bundle (IIFE defining ``window.CircuitsVis``) from the installed wheel,
    made safe to inline in a ``<script>`` element."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise StepflowError(
            f"the installed circuitsvis ({circuitsvis.__version__}) has no browser bundle at {path}; "
            "reinstall circuitsvis>=1.43 from a wheel"
        )
    js = path.read_text(encoding="utf-8")
    # The source-map comment would make devtools request iife.js.map next to the report.
    js = re.sub(r"//# sourceMappingURL=\S*\s*$", "", js)
    # "</script" inside a JS string would end the element early; "<\/" is the same string in JS.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def _json_for_script(obj: Any) -> str:
    # JSON inside <script> must not contain "</script>" or "<!--": escape the characters that
    # start them (still valid JSON/JS, decoded back to the same strings by the browser).
    text = json.dumps(obj, allow_nan=False, ensure_ascii=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _circuitsvis_props(data: StepMapData, row_normalise: bool) -> tuple[dict, float]:
    """Props for circuitsvis ``AttentionHeads`` with layers as "heads"; returns (props, scale).

    AttentionHeads colours a cell by value / maxValue with one maxValue for every small view and
    for the zoomed one, so dividing all layers by the single global max (and passing maxValue 1)
    gives every layer the same colour scale. Values are rounded to 4 decimals of that fraction
    to keep the page small.
    """
    maps = data.maps
    if row_normalise:
        sums = np.abs(maps).sum(axis=-1, keepdims=True)
        maps = np.divide(maps, sums, out=np.zeros_like(maps), where=sums > 0)
    scale = float(np.abs(maps).max())
    scaled = maps / scale if scale > 0 else maps
    # Whitespace in labels is stripped by circuitsvis' axis code; a middle dot keeps words apart.
    tokens = [re.sub(r"\s+", "\u00b7", t) for t in data.labels]
    props = {
        "attention": np.round(scaled, _VALUE_DECIMALS).tolist(),
        "tokens": tokens,
        "attentionHeadNames": [f"L{layer}" for layer in data.layers],
        "maxValue": 1.0,
        "minValue": -1.0,
        "maskUpperTri": True,
    }
    return props, scale


# ----------------------------------------------------------------------------- matplotlib


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure (no pyplot): no global figure registry, no display backend, Agg on save.
    return Figure(figsize=(width, height), layout="constrained")


def _integer_ticks_if_integral(ax, xs_list: list[np.ndarray]) -> None:
    # Layer indices are integers; fractional ticks ("1.5") would suggest half layers.
    if all(np.all(np.mod(xs, 1) == 0) for xs in xs_list):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _as_frame(obj: Any, what: str) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        return obj
    if hasattr(obj, "to_dataframe"):
        return obj.to_dataframe()
    raise StepflowError(f"{what} must be a pandas DataFrame or have .to_dataframe(), got {type(obj).__name__}")


def _per_layer_series(obj: Any, metric: str, x: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values, metric values) for one curve; duplicate x values are averaged."""
    if isinstance(obj, pd.DataFrame) or hasattr(obj, "to_dataframe"):
        df = _as_frame(obj, what)
        missing = [c for c in (x, metric) if c not in df.columns]
        if missing:
            raise StepflowError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")
        g = df.groupby(x, sort=True)[metric].mean()
        return g.index.to_numpy(dtype=np.float64), g.to_numpy(dtype=np.float64)
    y = _to_numpy(obj, what)
    if y.ndim != 1:
        raise StepflowError(f"{what} must be a 1-D per-layer array, got shape {tuple(y.shape)}")
    return np.arange(len(y), dtype=np.float64), y


def plot_metric_curves(
    diagnostics: Any,
    metric: str,
    *,
    x: str = "layer",
    by: str | None = None,
    title: str | None = None,
) -> Figure:
    """Line plot of one diagnostic over depth.

    diagnostics: a DataFrame (or object with ``.to_dataframe()``) with columns ``x`` and
    ``metric`` -- one line, or one line per value of column ``by``; or a dict
    {label: DataFrame | object with .to_dataframe() | 1-D array [layer]} -- one line per entry.
    Several rows at the same ``x`` are averaged.
    """
    if isinstance(diagnostics, Mapping):
        curves = {str(k): _per_layer_series(v, metric, x, f"diagnostics[{k!r}]") for k, v in diagnostics.items()}
    else:
        df = _as_frame(diagnostics, "diagnostics")
        if by is not None:
            if by not in df.columns:
                raise StepflowError(f"diagnostics lack the grouping column {by!r}; columns: {list(df.columns)}")
            curves = {str(k): _per_layer_series(g, metric, x, f"group {k!r}") for k, g in df.groupby(by, sort=True)}
        else:
            curves = {metric: _per_layer_series(df, metric, x, "diagnostics")}
    if not curves:
        raise StepflowError("plot_metric_curves got no curves to draw")
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    _integer_ticks_if_integral(ax, [xs for xs, _ in curves.values()])
    ax.set_title(title or f"{metric} over depth")
    ax.grid(alpha=0.3)
    if len(curves) > 1 or by is not None:
        ax.legend(fontsize="small")
    return fig


def _group_matrix(group: Any, metric: str, x: str, trace_col: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values [layer], values [trace, layer]) from a long frame or a [trace, layer] array."""
    if isinstance(group, pd.DataFrame) or hasattr(group, "to_dataframe"):
        df = _as_frame(group, what)
        missing = [c for c in (x, metric, trace_col) if c not in df.columns]
        if missing:
            raise StepflowError(
                f"{what} lacks column(s) {missing} (long format: one row per {trace_col} and {x}); "
                f"it has {list(df.columns)}"
            )
        wide = df.pivot_table(index=trace_col, columns=x, values=metric, aggfunc="mean").sort_index(axis=1)
        return wide.columns.to_numpy(dtype=np.float64), wide.to_numpy(dtype=np.float64)
    if isinstance(group, (list, tuple)) and group and not np.isscalar(group[0]):
        rows = [_to_numpy(g, what) for g in group]
        if len({r.shape for r in rows}) != 1:
            raise StepflowError(f"{what}: every trace needs the same number of layers, got {[r.shape for r in rows]}")
        arr = np.stack(rows)
    else:
        arr = _to_numpy(group, what)
    if arr.ndim != 2:
        raise StepflowError(f"{what} must be [trace, layer], got shape {tuple(arr.shape)}")
    return np.arange(arr.shape[1], dtype=np.float64), arr


def _mean_band(values: np.ndarray, band: str, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over traces and a 95% interval per layer. values: [trace, layer] (NaN = missing)."""
    from scipy import stats

    mean = np.nanmean(values, axis=0)
    low, high = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    rng = np.random.default_rng(seed)
    for j in range(values.shape[1]):
        col = values[:, j][np.isfinite(values[:, j])]
        if len(col) < 2:
            continue
        if band == "t":
            half = stats.t.ppf(0.975, len(col) - 1) * col.std(ddof=1) / math.sqrt(len(col))
            low[j], high[j] = col.mean() - half, col.mean() + half
        else:
            boots = rng.choice(col, size=(n_boot, len(col)), replace=True).mean(axis=1)
            low[j], high[j] = np.quantile(boots, [0.025, 0.975])
    return mean, low, high


def plot_group_bands(
    group_a: Any,
    group_b: Any,
    metric: str,
    *,
    labels: tuple[str, str] = ("correct", "incorrect"),
    x: str = "layer",
    trace_col: str = "trace",
    band: str = "t",
    n_boot: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    """Mean of a diagnostic over depth for two groups of traces, each with a 95% band.

    group_a, group_b: long DataFrames (columns ``trace_col``, ``x``, ``metric``; one row per
    trace and layer), or arrays [trace, layer], or lists of per-trace 1-D arrays [layer].
    band: "t" (Student-t interval of the mean) or "bootstrap" (percentile bootstrap of the
    mean, ``n_boot`` resamples drawn with ``seed``). Layers with fewer than 2 traces get no band.
    """
    if band not in ("t", "bootstrap"):
        raise StepflowError(f"band must be 't' or 'bootstrap', got {band!r}")
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    all_xs = []
    for i, (group, name) in enumerate(zip((group_a, group_b), labels)):
        xs, vals = _group_matrix(group, metric, x, trace_col, f"group {name!r}")
        all_xs.append(xs)
        mean, low, high = _mean_band(vals, band, n_boot, seed + i)
        line = ax.plot(xs, mean, marker="o", markersize=3, label=f"{name} (n={vals.shape[0]})")[0]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    _integer_ticks_if_integral(ax, all_xs)
    kind = "t-interval" if band == "t" else f"bootstrap, {n_boot} resamples"
    ax.set_title(title or f"{metric}: mean with 95% band ({kind})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_step_map(
    maps_layer: Any,
    labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    vmax: float | None = None,
    cmap: str = "Blues",
) -> Figure:
    """Heatmap of one layer's step map [step_q, step_k]: rows = query steps, columns = key steps.

    vmax: top of the colour scale (pass the global max to compare layers); default: this map's max.
    """
    m = _to_numpy(maps_layer, "maps_layer")
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise StepflowError(f"maps_layer must be [step_q, step_k] and square, got shape {tuple(m.shape)}")
    if not np.isfinite(m).all():
        raise StepflowError("maps_layer contains NaN or infinite values")
    axis_labels = step_axis_labels(labels, None, m.shape[0])
    n = m.shape[0]
    side = min(max(3.5, 0.22 * n + 2.5), 14.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    top = vmax if vmax is not None else (float(m.max()) if m.max() > 0 else 1.0)
    im = ax.imshow(m, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest")
    ticks = np.arange(n)
    ax.set_xticks(ticks, axis_labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks, axis_labels, fontsize=7)
    ax.set_xlabel("key step j")
    ax.set_ylabel("query step i")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_accuracy_by_difficulty(df: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Accuracy per difficulty level, one series per condition, with [low, high] error bars.

    df: columns condition, difficulty, accuracy, low, high (one row per condition and difficulty;
    low/high are the interval bounds, e.g. a bootstrap 95% interval).
    """
    df = _as_frame(df, "df")
    needed = ["condition", "difficulty", "accuracy", "low", "high"]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise StepflowError(f"plot_accuracy_by_difficulty needs columns {needed}; missing {missing}")
    bad = df[(df["low"] > df["accuracy"]) | (df["high"] < df["accuracy"])]
    if len(bad):
        raise StepflowError(f"every row needs low <= accuracy <= high; {len(bad)} row(s) violate it")
    levels = list(dict.fromkeys(df["difficulty"].tolist()))
    if all(isinstance(v, (int, float, np.number)) for v in levels):
        levels = sorted(levels)
    conditions = list(dict.fromkeys(df["condition"].tolist()))
    width = 0.8 / max(len(conditions), 1)
    fig = _new_figure(max(5.0, 1.1 * len(levels) + 2.5), 3.6)
    ax = fig.add_subplot()
    for c_i, cond in enumerate(conditions):
        sub = df[df["condition"] == cond].set_index("difficulty")
        xs, ys, errs = [], [], [[], []]
        for l_i, level in enumerate(levels):
            if level not in sub.index:
                continue
            row = sub.loc[level]
            xs.append(l_i + (c_i - (len(conditions) - 1) / 2) * width)
            ys.append(float(row["accuracy"]))
            errs[0].append(float(row["accuracy"] - row["low"]))
            errs[1].append(float(row["high"] - row["accuracy"]))
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=str(cond))
    ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    ax.set_xlabel("difficulty")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Accuracy by difficulty (error bars: interval low-high)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


def _figure_png_base64(fig: Figure, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- HTML report


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return _esc(f"{float(v):.4g}")
    return _esc(v)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.6em; } h3 { font-size: 1.1em; }
p.text { white-space: pre-wrap; overflow-wrap: anywhere; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: left;
  vertical-align: top; max-width: 60em; overflow-wrap: anywhere; white-space: pre-wrap; }
table.data th { background: #f2f2f2; }
table.data caption { text-align: left; font-weight: 600; padding: 4px 0; }
.cv-view { position: relative; }
figure { margin: 12px 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
.stepmaps { border: 1px solid #ddd; padding: 8px; margin: 12px 0; }
.note { font-size: 0.85em; color: #555; }
.cv-error { color: #a00; }
"""


class Report:
    """Builder for a self-contained, offline HTML report.

    Blocks are appended in order; ``save(path)`` / ``to_html()`` produce one HTML file that
    needs no network. The circuitsvis bundle (~1.3 MB) is inlined once, only if the report
    contains step maps.
    """

    def __init__(self, title: str, *, dpi: int = 110):
        self.title = str(title)
        self.dpi = int(dpi)
        self._blocks: list[str] = []
        self._views: list[tuple[str, dict]] = []

    def add_heading(self, text: str, level: int = 2) -> "Report":
        if level not in (1, 2, 3, 4):
            raise StepflowError(f"heading level must be 1-4, got {level}")
        self._blocks.append(f"<h{level}>{_esc(text)}</h{level}>")
        return self

    def add_text(self, text: str, *, css_class: str = "text") -> "Report":
        """Plain text (escaped; blank lines start new paragraphs, other whitespace is kept)."""
        for para in re.split(r"\n\s*\n", str(text)):
            if para.strip():
                self._blocks.append(f'<p class="{_esc(css_class)}">{_esc(para)}</p>')
        return self

    def add_table(self, df: Any, *, caption: str | None = None, index: bool = False, max_rows: int = 500) -> "Report":
        """A DataFrame (or object with ``.to_dataframe()``) as an escaped HTML table."""
        frame = _as_frame(df, "table")
        shown = frame.head(max_rows)
        cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
        parts = ['<table class="data">']
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr></thead><tbody>")
        for idx, row in zip(shown.index, shown.itertuples(index=False)):
            cells = ([idx] if index else []) + list(row)
            parts.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in cells) + "</tr>")
        parts.append("</tbody></table>")
        if len(frame) > max_rows:
            parts.append(f'<p class="note">{len(frame) - max_rows} more rows not shown.</p>')
        self._blocks.append("".join(parts))
        return self

    def add_figure(self, fig: Figure, caption: str | None = None) -> "Report":
        """A matplotlib figure as an inline base64 PNG."""
        if not isinstance(fig, Figure):
            raise StepflowError(f"add_figure expects a matplotlib Figure, got {type(fig).__name__}")
        data = _figure_png_base64(fig, self.dpi)
        alt = _esc(caption or "figure")
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        self._blocks.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>')
        return self

    def add_step_maps(
        self,
        result_or_arrays: Any,
        title: str | None = None,
        *,
        labels: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        kinds: Sequence[str] | None = None,
        row_normalise: bool = False,
        static_layers: Sequence[int] | None = (),
    ) -> "Report":
        """All layers of one trace in one interactive circuitsvis view, one shared colour scale.

        result_or_arrays: a StepSaliency-like result or an array [layer, step_q, step_k]
        (then pass ``labels``). row_normalise: divide each row by its sum before scaling
        (display only). static_layers: model layer indices to also draw as PNG heatmaps
        (readable without JavaScript, e.g. in a mail client), on the same colour scale.
        """
        data = step_map_data(result_or_arrays, labels, layers=layers, kinds=kinds)
        props, scale = _circuitsvis_props(data, row_normalise)
        view_id = f"stepflow-cv-{len(self._views)}"
        self._views.append((view_id, props))
        what = "row-normalised " if row_normalise else ""
        kind = data.map_kind or "unspecified"
        head = f"<h3>{_esc(title)}</h3>" if title else ""
        facts = [f"map kind: {kind}"]
        if data.pool:
            facts.append(f"pool: {data.pool}")
        if data.loss:
            facts.append(f"loss: {data.loss}")
        facts.append(f"{len(data.layers)} layers x {data.n_steps} steps")
        note = (
            f"Rows = query step i, columns = key step j. Small panels L&lt;layer&gt;: hover to zoom, "
            f"click to lock. One colour scale for all layers: cell value / {_esc(f'{scale:.4g}')} "
            f"(the global max of the {what}maps over all layers); the tooltip 'Val' is that fraction. "
            f"Grey cells are above the diagonal (a step cannot use later steps)."
        )
        self._blocks.append(
            f'<div class="stepmaps">{head}<p class="note">{_esc(" | ".join(facts))}</p>'
            f'<p class="note">{note}</p>'
            f'<div id="{view_id}" class="cv-view"></div>'
            f'<noscript><p class="cv-error">The interactive view needs JavaScript.</p></noscript></div>'
        )
        for layer in static_layers or ():
            if layer not in data.layers:
                raise StepflowError(f"static layer {layer} is not among the map layers {data.layers}")
            m = data.maps[data.layers.index(layer)]
            if row_normalise:
                s = m.sum(axis=-1, keepdims=True)
                m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
            fig = plot_step_map(m, data.labels, title=f"layer {layer}", vmax=scale if scale > 0 else None)
            self.add_figure(fig, f"Step map, layer {layer} ({kind}; same colour scale as the interactive view)")
        return self

    def _scripts(self) -> list[str]:
        if not self._views:
            return []
        calls = []
        for view_id, props in self._views:
            calls.append(
                f"try {{ CircuitsVis.render({json.dumps(view_id)}, CircuitsVis.AttentionHeads, "
                f"{_json_for_script(props)}); }} catch (e) {{ var el = document.getElementById("
                f"{json.dumps(view_id)}); el.className += ' cv-error'; "
                f"el.textContent = 'circuitsvis failed: ' + e; }}"
            )
        return [circuitsvis_bundle(), "\n".join(calls)]

    def to_html(self) -> str:
        """The whole page as one string."""
        scripts = self._scripts()
        hashes = " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode("ascii") + "'"
            for s in scripts
        )
        # Only this page's own scripts (by hash) may run and nothing may be fetched: an escaped
        # label can't become a script, and even if one did, the policy would refuse to run it.
        csp = (
            "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {hashes or chr(39) + 'none' + chr(39)}"
        )
        body = "\n".join(self._blocks)
        bundle = f"<script>{scripts[0]}</script>" if scripts else ""
        calls = f"<script>{scripts[1]}</script>" if scripts else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{_esc(csp)}">\n'
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n{bundle}\n</head>\n"
            f"<body>\n<h1>{_esc(self.title)}</h1>\n{body}\n{calls}\n</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write the report (UTF-8) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _diagnostics_tables(diagnostics: Any, layers: Sequence[int]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(per-layer frame, scalar frame) from a DataFrame, an object with .to_dataframe(), or a dict
    {name: scalar | 1-D array [layer]}."""
    if isinstance(diagnostics, Mapping):
        scalars = {k: v for k, v in diagnostics.items() if np.ndim(_to_numpy(v, f"diagnostics[{k!r}]")) == 0}
        curves = {k: _to_numpy(v, f"diagnostics[{k!r}]") for k, v in diagnostics.items() if k not in scalars}
        per_layer = None
        if curves:
            lengths = {len(v) for v in curves.values()}
            if len(lengths) != 1:
                raise StepflowError(f"per-layer diagnostics must all have the same length, got {sorted(lengths)}")
            n = lengths.pop()
            xs = list(layers) if len(layers) == n else list(range(n))
            per_layer = pd.DataFrame({"layer": xs, **curves})
        scalar = pd.DataFrame({"metric": list(scalars), "value": [float(v) for v in scalars.values()]}) if scalars else None
        return per_layer, scalar
    scalar = None
    if callable(getattr(diagnostics, "summary", None)):
        # A stepflow_tl.diagnostics.Diagnostics: its headline numbers are per-trace scalars.
        head = diagnostics.summary(include_meta=False)
        scalar = pd.DataFrame({"metric": list(head), "value": list(head.values())})
    return _as_frame(diagnostics, "diagnostics"), scalar


def save_result_html(result: Any, path: str | Path, diagnostics: Any = None, *, title: str | None = None) -> Path:
    """Write one StepSaliency-like result (and optional diagnostics) as a self-contained report.

    diagnostics: a ``stepflow_tl.diagnostics.Diagnostics`` (per-layer table, headline numbers
    from ``.summary()``, ``.notes``), a per-layer DataFrame (column "layer" plus one numeric
    column per metric), any object with ``.to_dataframe()``, or a dict
    {metric: scalar | 1-D array [layer]}.
    """
    data = step_map_data(result)
    meta = data.meta
    name = meta.get("trace_id") or meta.get("trace") or meta.get("id")
    report = Report(title or (f"Step maps: {name}" if name else "Step maps"))
    report.add_heading("What this shows")
    kind_text = MAP_KIND_TEXT.get(data.map_kind, "map kind not recorded")
    pool_text = POOL_TEXT.get(data.pool, data.pool or "not recorded")
    report.add_table(
        pd.DataFrame(
            {
                "field": ["map kind", "pool", "loss", "layers", "steps"],
                "value": [
                    f"{data.map_kind or 'unspecified'}: {kind_text}",
                    f"{data.pool or 'unspecified'}: {pool_text}",
                    data.loss or "not recorded",
                    ", ".join(map(str, data.layers)),
                    str(data.n_steps),
                ],
            }
        )
    )
    if meta:
        report.add_heading("Trace", 3)
        report.add_table(pd.DataFrame({"key": list(meta), "value": [_meta_value(v) for v in meta.values()]}))
    report.add_heading("Step maps (all layers)")
    shallow, deep = data.layers[0], data.layers[-1]
    report.add_step_maps(data, static_layers=sorted({shallow, deep}))
    report.add_heading("Steps", 3)
    kinds = data.kinds or [""] * data.n_steps
    report.add_table(pd.DataFrame({"step": range(data.n_steps), "kind": kinds, "label": data.labels}))
    if diagnostics is not None:
        per_layer, scalar = _diagnostics_tables(diagnostics, data.layers)
        report.add_heading("Diagnostics")
        if per_layer is not None:
            x = "layer" if "layer" in per_layer.columns else None
            if x is None:
                raise StepflowError(f"per-layer diagnostics need a 'layer' column; got {list(per_layer.columns)}")
            metrics = [c for c in per_layer.columns if c != x and pd.api.types.is_numeric_dtype(per_layer[c])]
            report.add_text("Metrics shown: " + ", ".join(map(str, metrics)), css_class="note")
            for metric in metrics:
                report.add_figure(plot_metric_curves(per_layer, metric, x=x), f"{metric} by layer")
            report.add_table(per_layer, caption="Per-layer diagnostics")
        if scalar is not None:
            report.add_table(scalar, caption="Per-trace diagnostics")
        notes = getattr(diagnostics, "notes", None)
        if isinstance(notes, Mapping) and notes:
            report.add_table(
                pd.DataFrame({"metric": list(notes), "note": [str(v) for v in notes.values()]}),
                caption="Why some metrics are missing or partial",
            )
        report.add_heading("Metric legend", 3)
        report.add_table(pd.DataFrame({"metric": list(METRIC_LEGEND), "definition": list(METRIC_LEGEND.values())}))
    return report.save(path)


def _meta_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(v)
