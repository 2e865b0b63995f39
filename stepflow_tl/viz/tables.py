"""Tables for people: the machine columns of a result frame turned into cells a reader can scan.

The CSV files keep the machine columns (``acc_low``, ``mcnemar_p``, ...); the HTML report shows
the same numbers through `readable_table`: a header in words, numbers rounded to what the
statistics can support, proportions as percentages, a ``<x>_low``/``<x>_high`` (or
``ci_low``/``ci_high``) pair as one ``[a, b]`` column, and a missing value as an em dash.

Each number column has a *kind*: ``"int"``, ``"num"`` (3 decimals below 10, 1 below 1,000, none above),
``"signed"`` (``num`` with a sign), ``"pct"`` (a proportion as ``12.3%``), ``"pp"`` (a difference of
proportions in percentage points, ``+8.3 pp``), ``"p"`` (a p-value: 3 decimals, ``<0.001``),
``"ratio"`` (``1.23x``), ``"seconds"``; ``"text"`` for everything else. Callers that know what
a column measures pass its kind; the rest is inferred from the name and dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import StepflowError

MISSING = "\u2014"  # an em dash: "no value here" without pandas' <NA> / nan

KINDS = ("text", "int", "num", "signed", "pct", "pp", "p", "ratio", "seconds")

# Machine words a header spells out; anything else keeps its name with spaces for underscores.
_HEADER_WORDS = {
    "n": "n", "p": "p", "p_holm": "p (Holm)", "mcnemar_p": "McNemar p",
    "n_paired": "paired", "n_changed": "changed outputs", "mean_tokens": "mean tokens",
    "wall_time_s": "wall time", "time_ratio": "time ratio", "events_per_item": "events / item",
    "effect_name": "effect measure", "rho_mean": "mean rho", "n_traces": "traces",
    "repair_direction": "repair direction", "baseline_mean": "baseline mean",
    "condition_mean": "condition mean", "treatment_diff": "treatment - baseline",
    "control_diff": "control - baseline", "problem_id": "problem", "n_tokens": "tokens",
    "b01": "only condition right", "b10": "only reference right",
}


# Differences and effects: the sign is the finding, so it is always shown.
_SIGNED = {"diff", "advantage", "effect", "rho_mean", "ds_slope_deep"}


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isnan(float(v))


def _num(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.001:
        return f"{v:.3f}"
    return f"{v:.1e}"


def format_value(v: Any, kind: str) -> str:
    """One cell as text; a missing value (None, NA, NaN) is an em dash."""
    if kind not in KINDS:
        raise StepflowError(f"unknown column kind {kind!r}; expected one of {list(KINDS)}")
    if _is_missing(v):
        return MISSING
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return str(v)
    if kind == "text":  # a number in a mixed column still gets rounded
        return str(v) if isinstance(v, numbers.Integral) else _num(float(v))
    v = float(v)
    if math.isinf(v):
        return "\u221e" if v > 0 else "-\u221e"
    if kind == "int":
        return f"{v:,.0f}" if v == round(v) else _num(v)
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "pp":
        return f"{100 * v:+.1f} pp"
    if kind == "p":
        return "<0.001" if v < 0.001 else f"{v:.3f}"
    if kind == "ratio":
        return f"{v:.2f}\u00d7"
    if kind == "seconds":
        return f"{v:.1f} s" if v < 600 else f"{v / 60:.1f} min"
    text = _num(v)
    return f"+{text}" if kind == "signed" and v > 0 else text


def header_text(name: Any) -> str:
    """A machine column name in words (``mcnemar_p`` -> "McNemar p", ``mean_tokens`` -> "mean tokens")."""
    name = str(name)
    return _HEADER_WORDS.get(name, name.replace("_", " "))


def _inferred_kind(name: str, series: pd.Series) -> str:
    if name in ("p", "p_holm") or name.endswith("_p"):
        return "p"
    if pd.api.types.is_float_dtype(series) and (name in _SIGNED or name.endswith("_diff")):
        return "signed"
    if pd.api.types.is_bool_dtype(series):
        return "text"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        values = series.dropna().to_numpy()
        # float columns that only hold whole numbers are counts with a missing value (n_changed, b01)
        return "int" if values.size and np.all(values == np.round(values)) and name.startswith(("n_", "b")) else "num"
    if series.dtype == object and series.map(lambda v: _is_missing(v) or isinstance(v, numbers.Integral)).all() \
            and series.map(lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)).any():
        return "int"
    return "text"


def _interval_pairs(columns: Sequence[str]) -> dict[str, tuple[str, str, str | None]]:
    """{low column: (low, high, estimate column or None)} for every ``<x>_low``/``<x>_high``
    pair; ``ci_low``/``ci_high`` (and ``low``/``high``) estimate the column just before them."""
    out = {}
    for i, c in enumerate(columns):
        if not c.endswith("low"):
            continue
        stem = c[: -len("low")]
        high = stem + "high"
        if high not in columns:
            continue
        est = stem.rstrip("_") if stem.rstrip("_") in columns else None
        if est is None and stem in ("ci_", "") and i > 0:
            est = columns[i - 1]
        out[c] = (c, high, est)
    return out


@dataclass(frozen=True)
class ReadableTable:
    """Display strings of a table: ``headers``, ``rows`` (lists of strings) and which
    columns hold numbers (``numeric``: right-aligned, never wrapped)."""

    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.headers)


def readable_table(
    frame: pd.DataFrame,
    *,
    kinds: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    interval_label: str = "95% CI",
    merge_estimates: bool = True,
    estimates: Mapping[str, str] | None = None,
) -> ReadableTable:
    """The cells of ``frame`` for a reader.

    kinds: column -> kind (see the module doc); columns not named are inferred (p-values by
    name, counts by dtype, other floats as ``num``, the rest as text). An interval takes its
    estimate's kind. headers: column -> header text, overriding the built-in words; an
    interval's header is its estimate's header plus ``interval_label`` (or ``interval_label``
    alone), and can be set under the name of its low column. merge_estimates: an interval whose
    estimate is a column of its own is shown with it, "estimate [low, high]", under the
    estimate's header plus "(95% CI)". estimates: low column -> its estimate column, where the
    names do not say it (``{"acc_low": "accuracy"}``).
    """
    kinds = dict(kinds or {})
    headers = dict(headers or {})
    bad = {c: k for c, k in kinds.items() if k not in KINDS}
    if bad:
        raise StepflowError(f"unknown column kind(s) {bad}; expected one of {list(KINDS)}")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise StepflowError(f"a table needs unique column names; got {columns}")
    frame = frame.set_axis(columns, axis=1)
    kind_of = {c: kinds.get(c) or _inferred_kind(c, frame[c]) for c in columns}
    pairs = _interval_pairs(columns)
    for low, est in (estimates or {}).items():
        if low not in pairs or est not in columns:
            raise StepflowError(f"estimates: {low!r} is not the low end of an interval or {est!r} is not a column")
        pairs[low] = (low, pairs[low][1], est)
    highs = {high for _, high, _ in pairs.values()}
    for low, (_, high, est) in list(pairs.items()):
        if est is not None and kind_of[est] == "text":  # the column before a ci_low pair is no estimate
            est = None
            pairs[low] = (low, high, None)
        kind_of[low] = kinds.get(low) or (kind_of[est] if est else kind_of[low])
        if kind_of[low] == "int":
            kind_of[low] = "num"
    merged = {est: low for low, (_, _, est) in pairs.items() if est is not None and merge_estimates}
    skip = highs | set(merged.values())
    out_headers, numeric, plan = [], [], []
    for c in columns:
        if c in skip:
            continue
        if c in merged:  # "estimate [low, high]" in one cell
            low = merged[c]
            out_headers.append(headers.get(c, header_text(c)) + f" ({interval_label})")
            plan.append((c, low, pairs[low][1], kind_of[low]))
        elif c in pairs:
            _, high, est = pairs[c]
            label = headers.get(c) or (f"{headers.get(est, header_text(est))} {interval_label}" if est else interval_label)
            out_headers.append(label)
            plan.append((None, c, high, kind_of[c]))
        else:
            out_headers.append(headers.get(c, header_text(c)))
            plan.append((c, None, None, kind_of[c]))
        numeric.append(kind_of[c] != "text")
    rows = []
    for rec in frame.itertuples(index=False, name=None):
        values = dict(zip(columns, rec))
        row = []
        for est, low, high, kind in plan:
            cell = format_value(values[est], kind) if est is not None else ""
            if low is not None and not (_is_missing(values[low]) and _is_missing(values[high])):
                unit = " pp" if kind == "pp" else ""  # said once, after the estimate, not three times
                bounds = [format_value(values[b], kind).removesuffix(unit) for b in (low, high)]
                cell = (f"{cell} " if cell and cell != MISSING else "") + f"[{bounds[0]}, {bounds[1]}]"
            row.append(cell or MISSING)
        rows.append(row)
    return ReadableTable(out_headers, rows, numeric)
