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
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import StepflowError
from .plots import _as_frame, plot_metric_curves, plot_step_map
from .stepmaps import (
    MAP_KIND_TEXT,
    POOL_TEXT,
    _COLOUR_LABEL,
    _circuitsvis_props,
    _json_for_script,
    _to_numpy,
    circuitsvis_bundle,
    resolve_view,
    step_map_data,
    view_note,
    view_values,
)
from .tables import readable_table

def _figure_png_base64(fig: Figure, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- HTML report


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1280px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.6em; } h3 { font-size: 1.1em; }
p.text { white-space: pre-wrap; overflow-wrap: anywhere; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: left;
  vertical-align: top; max-width: 60em; overflow-wrap: break-word; white-space: pre-wrap; }
table.data th { background: #f2f2f2; white-space: nowrap; vertical-align: bottom; }
table.data th.num, table.data td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.table-wrap { overflow-x: auto; }
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

    def add_table(
        self,
        df: Any,
        *,
        caption: str | None = None,
        index: bool = False,
        max_rows: int = 500,
        kinds: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        estimates: Mapping[str, str] | None = None,
    ) -> "Report":
        """A DataFrame (or object with ``.to_dataframe()``) as an escaped HTML table for a reader:
        headers in words, rounded numbers, intervals as "[a, b]", missing values as an em dash
        (`stepflow_tl.viz.tables.readable_table`; ``kinds``, ``headers``, ``estimates`` go to it)."""
        frame = _as_frame(df, "table")
        shown = frame.head(max_rows)
        if index:
            shown = shown.reset_index()
        table = readable_table(shown, kinds=kinds, headers=headers, estimates=estimates)
        parts = ['<div class="table-wrap"><table class="data">']
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(
            f'<th class="{"num" if num else "text"}">{_esc(h)}</th>' for h, num in zip(table.headers, table.numeric)
        ) + "</tr></thead><tbody>")
        for row in table.rows:
            parts.append("<tr>" + "".join(
                f'<td class="num">{_esc(v)}</td>' if num else f"<td>{_esc(v)}</td>"
                for v, num in zip(row, table.numeric)
            ) + "</tr>")
        parts.append("</tbody></table></div>")
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
        view: str | None = None,
        bands: Mapping[str, Sequence[int]] | None = None,
        static_layers: Sequence[int] | None = (),
        row_normalise: bool | None = None,
    ) -> "Report":
        """All layers of one trace in one interactive circuitsvis view.

        result_or_arrays: a StepSaliency-like result or an array [layer, step_q, step_k]
        (then pass ``labels``). view: how a cell becomes a colour (`stepflow_tl.viz.stepmaps.VIEWS`;
        default ``"row_log"``, each cell's share of its row on a log scale); the page says which.
        bands: ``{name: model layers}`` to draw one panel per band (the mean of its layers)
        instead of one per layer. static_layers: model layer indices to also draw as PNG
        heatmaps (readable without JavaScript, e.g. in a mail client), in the same view.
        row_normalise: deprecated (True is ``view="row"``, False ``view="global"``).
        """
        view = resolve_view(view, row_normalise)
        data = step_map_data(result_or_arrays, labels, layers=layers, kinds=kinds)
        props, scale = _circuitsvis_props(data, view, bands)
        view_id = f"stepflow-cv-{len(self._views)}"
        self._views.append((view_id, props))
        kind = data.map_kind or "unspecified"
        head = f"<h3>{_esc(title)}</h3>" if title else ""
        facts = [f"map kind: {kind}"]
        if data.pool:
            facts.append(f"pool: {data.pool}")
        if data.loss:
            facts.append(f"loss: {data.loss}")
        facts.append(f"{len(data.layers)} layers x {data.n_steps} steps")
        if bands:
            facts.append("panels: band means (" + ", ".join(props["attentionHeadNames"]) + ")")
        note = (
            "Rows = query step i, columns = key step j. Small panels: hover to zoom, click to lock. "
            f"{view_note(view, scale)} Grey cells are above the diagonal (a step cannot use later steps)."
        )
        self._blocks.append(
            f'<div class="stepmaps">{head}<p class="note">{_esc(" | ".join(facts))}</p>'
            f'<p class="note">{_esc(note)}</p>'
            f'<div id="{view_id}" class="cv-view"></div>'
            f'<noscript><p class="cv-error">The interactive view needs JavaScript.</p></noscript></div>'
        )
        values = None
        for layer in static_layers or ():
            if layer not in data.layers:
                raise StepflowError(f"static layer {layer} is not among the map layers {data.layers}")
            if values is None:
                values, _ = view_values(data.maps, view)
            fig = plot_step_map(values[data.layers.index(layer)], data.labels, title=f"layer {layer}", vmax=1.0,
                                colorbar_label=_COLOUR_LABEL[view])
            self.add_figure(fig, f"Step map, layer {layer} ({kind}; view '{view}', as in the interactive view)")
        return self

    def add_step_maps_row(self, items: Sequence[tuple[Any, str]], **kwargs: Any) -> "Report":
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


@runtime_checkable
class ExplainsMetrics(Protocol):
    """Diagnostics that carry the names and formulas of their metrics (``{name: definition}``),
    so the report's legend is read from where the metrics are defined, never restated here."""

    @property
    def legend(self) -> Mapping[str, str]: ...


@runtime_checkable
class HasBands(Protocol):
    """Diagnostics that know their layer bands (``{band: model layers}``)."""

    @property
    def bands(self) -> Mapping[str, Sequence[int]]: ...


def save_result_html(
    result: Any,
    path: str | Path,
    diagnostics: Any = None,
    *,
    title: str | None = None,
    view: str | None = None,
    legend: Mapping[str, str] | None = None,
) -> Path:
    """Write one StepSaliency-like result (and optional diagnostics) as a self-contained report.

    diagnostics: a ``stepflow_tl.saliency.diagnostics.Diagnostics`` (per-layer table, headline numbers
    from ``.summary()``, ``.notes``, the band-mean maps of its ``.bands`` and the metric legend
    of its ``.legend``), a per-layer DataFrame (column "layer" plus one numeric column per metric),
    any object with ``.to_dataframe()``, or a dict {metric: scalar | 1-D array [layer]}.
    view: how the step maps are coloured (`stepflow_tl.viz.stepmaps.VIEWS`). legend: {metric:
    definition} for diagnostics that do not carry one.
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
    report.add_step_maps(data, view=view, static_layers=sorted({shallow, deep}))
    if isinstance(diagnostics, HasBands):
        report.add_step_maps(data, "Band means (the diagnostics' bands)", view=view, bands=diagnostics.bands)
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
        if legend is None and isinstance(diagnostics, ExplainsMetrics):
            legend = diagnostics.legend
        if legend:
            report.add_heading("Metric legend", 3)
            report.add_table(pd.DataFrame({"metric": list(legend), "definition": list(legend.values())}))
    return report.save(path)


def _meta_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(v)
