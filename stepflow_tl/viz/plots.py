"""Matplotlib figures of diagnostics and studies: metric curves by layer, group means
with intervals, one step map, accuracy by difficulty. Bare ``Figure`` objects, no pyplot
state."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from ..errors import StepflowError
from ..stats import bootstrap_mean_ci
from .stepmaps import _to_numpy, step_axis_labels


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
    mean = np.nanmean(values, axis=0)
    low, high = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    for j in range(values.shape[1]):
        col = values[:, j][np.isfinite(values[:, j])]
        if len(col) < 2:
            continue
        if band == "t":
            half = stats.t.ppf(0.975, len(col) - 1) * col.std(ddof=1) / math.sqrt(len(col))
            low[j], high[j] = col.mean() - half, col.mean() + half
        else:
            ci = bootstrap_mean_ci(col, n_boot=n_boot, seed=seed)
            low[j], high[j] = ci.low, ci.high
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
    colorbar_label: str | None = None,
) -> Figure:
    """Heatmap of one layer's step map [step_q, step_k]: rows = query steps, columns = key steps.

    vmax: top of the colour scale (pass the global max to compare layers); default: this map's max.
    colorbar_label: what the colours measure (e.g. the report's view).
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
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    if colorbar_label:
        bar.set_label(colorbar_label, fontsize=8)
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


def plot_receiver_heads(
    kurtosis: Any,
    layers: Sequence[int],
    step_scores: Any,
    labels: Sequence[str] | None = None,
    *,
    importance: Any = None,
    importance_label: str = "resampling importance",
    title: str | None = None,
) -> Figure:
    """Receiver heads of one trace: the kurtosis of every (layer, head) as a heatmap, and
    each step's receiver score (mean vertical score over the top heads) as bars; with
    ``importance`` (one value per step, NaN where not measured) a second bar panel beside
    it, so the cheap signal and the causal one read side by side."""
    k = _to_numpy(kurtosis, "kurtosis")
    scores = _to_numpy(step_scores, "step_scores")
    if k.ndim != 2 or k.shape[0] != len(layers):
        raise StepflowError(f"kurtosis must be [layer, head] with one row per layer, got {tuple(k.shape)}")
    axis_labels = step_axis_labels(labels, None, scores.shape[0])
    panels = 3 if importance is not None else 2
    fig = _new_figure(5.0 * panels, max(3.5, 0.12 * len(layers) + 2.5))
    axes = fig.subplots(1, panels)
    im = axes[0].imshow(np.where(np.isfinite(k), k, np.nan), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    step = max(1, len(layers) // 12)
    axes[0].set_yticks(np.arange(0, len(layers), step), [str(l) for l in layers][::step])
    axes[0].set_title("kurtosis of vertical scores")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    bars = [(axes[1], scores, "receiver score (top heads)")]
    if importance is not None:
        bars.append((axes[2], _to_numpy(importance, "importance"), importance_label))
    for ax, values, name in bars:
        xs = np.arange(len(values))
        ax.bar(xs, np.nan_to_num(values, nan=0.0), color="tab:blue" if ax is axes[1] else "tab:orange")
        ax.set_xticks(xs, axis_labels, rotation=90, fontsize=7)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    return fig
