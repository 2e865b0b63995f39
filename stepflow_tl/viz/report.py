"""The self-contained HTML report: step maps in circuitsvis, figures, tables, legends.

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
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import StepflowError
from .plots import _as_frame, plot_metric_curves, plot_step_map
from .stepmaps import (
    MAP_KIND_TEXT,
    POOL_TEXT,
    _circuitsvis_props,
    _json_for_script,
    _to_numpy,
    circuitsvis_bundle,
    step_map_data,
)

# Names and formulas of the diagnostics (docs/method.md, diagnostics); every report that shows
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

    def add_step_maps_row(self, items: Sequence[tuple[Any, str]], **kwargs) -> "Report":
        """Several step-map views side by side (e.g. before and after an intervention):
        ``items`` are ``(result, title)`` pairs; ``kwargs`` go to `add_step_maps`. Each
        view keeps its own colour scale, which its note states."""
        first = len(self._blocks)
        for result, title in items:
            self.add_step_maps(result, title, **kwargs)
        cells = "".join(f'<div style="flex:1 1 0;min-width:22em">{b}</div>' for b in self._blocks[first:])
        self._blocks[first:] = [f'<div style="display:flex;gap:1.5em;flex-wrap:wrap">{cells}</div>']
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
        # A stepflow_tl.saliency.diagnostics.Diagnostics: its headline numbers are per-trace scalars.
        head = diagnostics.summary(include_meta=False)
        scalar = pd.DataFrame({"metric": list(head), "value": list(head.values())})
    return _as_frame(diagnostics, "diagnostics"), scalar


def save_result_html(result: Any, path: str | Path, diagnostics: Any = None, *, title: str | None = None) -> Path:
    """Write one StepSaliency-like result (and optional diagnostics) as a self-contained report.

    diagnostics: a ``stepflow_tl.saliency.diagnostics.Diagnostics`` (per-layer table, headline numbers
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
