"""Step maps ready to draw: validated arrays and labels (`StepMapData`), the circuitsvis
props that give every layer one colour scale, and `step_maps_view`, the notebook view.

Everything that draws step maps -- the notebook view, the report, the static figures --
starts from `step_map_data`, which accepts a ``StepSaliency``-like result (``.maps``
[layer, step_q, step_k], ``.layers``, ``.step_kinds``, ``.step_labels``, ``.map_kind``,
``.pool``, ``.loss``, ``.meta``) or plain arrays.
"""

from __future__ import annotations

import html
import json
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import circuitsvis
import numpy as np
import torch
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from ..errors import StepflowError
from ..traces.formats import STEP_KINDS

_KIND_PREFIX = {kind: kind[0].upper() for kind in STEP_KINDS}
_LABEL_CHARS = 28
_VALUE_DECIMALS = 4

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


# ----------------------------------------------------------------------------- step map data


@runtime_checkable
class StepMapResult(Protocol):
    """What the drawing layer reads from a step-map result. `stepflow_tl.saliency.StepSaliency`
    is one; ``viz`` sits below ``saliency`` and names the shape, never the class."""

    @property
    def maps(self) -> Float[Union[Tensor, np.ndarray], "layer step_q step_k"]: ...

    @property
    def layers(self) -> Sequence[int]: ...

    @property
    def step_kinds(self) -> Optional[Sequence[str]]: ...

    @property
    def step_labels(self) -> Optional[Sequence[str]]: ...

    @property
    def map_kind(self) -> str: ...

    @property
    def pool(self) -> str: ...

    @property
    def loss(self) -> str: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class StepMapData:
    """Validated step maps ready to draw.

    maps: float64 ndarray [layer, step_q, step_k]; layers: model layer index of each row;
    labels: one unique display label per step; kinds: step kind per step (or None);
    map_kind / pool / loss: provenance strings ("" when unknown); meta: JSON-safe dict.

    Not a copy of ``StepSaliency``: drawing functions take any `StepMapResult` (or bare arrays)
    and read it through the protocol once, here. What this adds is what drawing needs and
    a result does not have: the maps as a finite float64 array (checked once, not per view)
    and the *display* labels, cut to 28 characters and made unique, because circuitsvis keys
    its axis categories by label text. Bare arrays become one of these too.
    """

    maps: Float[np.ndarray, "layer step_q step_k"]
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
    if isinstance(result_or_maps, StepMapData):
        if labels is None and layers is None and kinds is None:
            return result_or_maps
        r = result_or_maps
        raw, labels = r.maps, labels if labels is not None else r.labels
        kinds = kinds if kinds is not None else r.kinds
        layers = layers if layers is not None else r.layers
        map_kind, pool, loss = map_kind or r.map_kind, pool or r.pool, loss or r.loss
        meta = meta if meta is not None else r.meta
    elif isinstance(result_or_maps, StepMapResult):
        r = result_or_maps
        raw = r.maps
        labels = labels if labels is not None else r.step_labels
        kinds = kinds if kinds is not None else r.step_kinds
        layers = layers if layers is not None else r.layers
        map_kind, pool, loss = map_kind or r.map_kind or "", pool or r.pool or "", loss or r.loss or ""
        meta = meta if meta is not None else (r.meta or {})
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


# How a cell becomes a colour. Real traces put most of a row's mass on a few cells near the
# diagonal (about half of it on the diagonal itself in R1 traces), so one linear scale over
# every layer leaves almost every cell white; the default view reads each cell as its share
# of the row on a log scale, which is comparable across layers and shows the off-diagonal
# structure (docs/visualisation.md has the measurements behind the choice).
LOG_DECADES = 3
VIEWS: dict[str, str] = {
    "row_log": f"each cell as its share of the query step's row (cell / the row's sum), on a log scale "
    f"from {10.0 ** -LOG_DECADES:.1%} (white) to 100% (darkest); one scale for every panel",
    "row": "each cell as its share of the query step's row (cell / the row's sum), linear from 0 (white) "
    "to the largest share on the page (darkest); one scale for every panel",
    "layer": "each cell / the largest cell of its own panel, linear: one scale per panel (compare cells "
    "within a panel, not colours across panels)",
    "layer_log": f"each cell / the largest cell of its own panel, on a log scale from {10.0 ** -LOG_DECADES:.1%} "
    "(white) to 100% (darkest): one scale per panel",
    "global": "each cell / the largest cell over every panel, linear: one scale for all panels (absolute "
    "magnitudes; on real traces a few cells near the diagonal dominate and most cells look white)",
}
DEFAULT_VIEW = "row_log"
# The colour bar of a static figure in each view.
_COLOUR_LABEL = {
    "row_log": "share of the row (log position: 0 = 0.1%, 1 = 100%)",
    "row": "share of the row / the largest share",
    "layer": "cell / the layer's largest cell",
    "layer_log": "cell / the layer's largest cell (log position: 0 = 0.1%, 1 = 100%)",
    "global": "cell / the largest cell of all layers",
}


def check_view(view: str) -> str:
    """``view`` if it names one of `VIEWS`, else a `StepflowError` listing them."""
    if view not in VIEWS:
        raise StepflowError(f"unknown step-map view {view!r}; expected one of {list(VIEWS)}")
    return view


def _log_position(x: np.ndarray) -> np.ndarray:
    """x in (0, 1] -> 0 at 10**-LOG_DECADES (and below), 1 at 1, linear in log10(x)."""
    logs = np.log10(np.maximum(x, 10.0 ** -(LOG_DECADES + 1)))
    return np.clip(1.0 + logs / LOG_DECADES, 0.0, 1.0)


def view_values(maps: np.ndarray, view: str = DEFAULT_VIEW) -> tuple[np.ndarray, float]:
    """The colour position in [0, 1] of every cell of ``maps`` [panel, step_q, step_k] under
    ``view`` (see `VIEWS`), and the scale: the divisor of the linear ``global`` and ``row``
    views (the largest cell / share), 1.0 for the others."""
    check_view(view)
    maps = np.abs(maps)
    if view in ("row", "row_log"):
        sums = maps.sum(axis=-1, keepdims=True)
        maps = np.divide(maps, sums, out=np.zeros_like(maps), where=sums > 0)
        if view == "row_log":
            return _log_position(maps) * (maps > 0), 1.0
    if view in ("layer", "layer_log"):
        tops = maps.max(axis=(-2, -1), keepdims=True)
        maps = np.divide(maps, tops, out=np.zeros_like(maps), where=tops > 0)
        return (_log_position(maps) * (maps > 0) if view == "layer_log" else maps), 1.0
    scale = float(maps.max()) if maps.size else 0.0
    return (maps / scale if scale > 0 else maps), scale


def band_panels(data: StepMapData, bands: Mapping[str, Sequence[int]]) -> tuple[np.ndarray, list[str]]:
    """One panel per band: the mean of the band's layers present in ``data`` ([band, step_q,
    step_k]) and its name with the layers ("shallow L0-6"); bands with no layer here are left out."""
    panels, names = [], []
    for band, layers in bands.items():
        rows = [data.layers.index(l) for l in layers if l in data.layers]
        if rows:
            panels.append(data.maps[rows].mean(axis=0))
            present = [data.layers[r] for r in rows]
            span = f"L{present[0]}" if len(present) == 1 else f"L{present[0]}-{present[-1]}"
            names.append(f"{band} {span}")
    if not panels:
        raise StepflowError(f"none of the bands {dict(bands)} has a layer among the map layers {data.layers}")
    return np.stack(panels), names


def _circuitsvis_props(
    data: StepMapData, view: str = DEFAULT_VIEW, bands: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict, float]:
    """Props for circuitsvis ``AttentionHeads`` with layers (or ``bands``) as "heads"; returns
    (props, scale) with the scale of `view_values`.

    AttentionHeads colours a cell by value / maxValue with one maxValue for every small view and
    for the zoomed one, so the cells go in as their colour position in [0, 1] (`view_values`)
    with maxValue 1. Values are rounded to 4 decimals to keep the page small.
    """
    if bands:
        maps, names = band_panels(data, bands)
    else:
        maps, names = data.maps, [f"L{layer}" for layer in data.layers]
    values, scale = view_values(maps, view)
    # Whitespace in labels is stripped by circuitsvis' axis code; a middle dot keeps words apart.
    tokens = [re.sub(r"\s+", "\u00b7", t) for t in data.labels]
    props = {
        "attention": np.round(values, _VALUE_DECIMALS).tolist(),
        "tokens": tokens,
        "attentionHeadNames": names,
        "maxValue": 1.0,
        "minValue": -1.0,
        "maskUpperTri": True,
    }
    return props, scale


def view_note(view: str, scale: float) -> str:
    """What the colours of a panel mean under ``view``, for the page (tooltip included)."""
    text = VIEWS[check_view(view)]
    if view == "global":
        text += f"; the largest cell is {scale:.4g}"
    elif view == "row":
        text += f"; the largest share is {scale:.1%}"
    tip = "a cell's position on that log scale (0-1)" if view.endswith("_log") else "that fraction"
    return f"View '{view}': {text}. The tooltip 'Val' is {tip}."


def resolve_view(view: str | None, row_normalise: bool | None) -> str:
    """The view for a call that may still pass the deprecated ``row_normalise``."""
    if row_normalise is None:
        return check_view(view or DEFAULT_VIEW)
    warnings.warn("row_normalise is deprecated (it goes in the next release); pass view='row' "
                  "(row_normalise=True) or view='global' (row_normalise=False)", DeprecationWarning, stacklevel=3)
    if view is not None:
        raise StepflowError("pass view or the deprecated row_normalise, not both")
    return "row" if row_normalise else "global"


class StepMapsView(RenderedHTML):
    """A circuitsvis ``RenderedHTML`` that always shows its self-contained page.

    circuitsvis' own objects probe the network (``internet_on``) each time a notebook
    displays them and then load their JavaScript from a CDN; this one inlines the
    installed circuitsvis bundle, so it renders the same with or without a network."""

    def _repr_html_(self) -> str:
        return self.local_src


def step_maps_view(
    result_or_arrays: Any,
    labels: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    view: str | None = None,
    bands: Mapping[str, Sequence[int]] | None = None,
    row_normalise: bool | None = None,
) -> StepMapsView:
    """All layers of one trace (or the means of ``bands``) in one circuitsvis ``AttentionHeads``
    view for a notebook cell, coloured by ``view`` (`VIEWS`; default `DEFAULT_VIEW`).
    ``row_normalise`` is deprecated: True is ``view="row"``, False ``view="global"``.

    Returns a `StepMapsView` (a circuitsvis ``RenderedHTML``): displayed in Jupyter it
    renders offline; ``.local_src`` is its HTML.
    """
    view = resolve_view(view, row_normalise)
    data = step_map_data(result_or_arrays, labels, layers=layers, kinds=kinds)
    props, scale = _circuitsvis_props(data, view, bands)
    view_id = "stepflow-cv-" + uuid.uuid4().hex[:12]
    page = (
        f'<p style="font-size: 0.85em; color: #555;">{html.escape(view_note(view, scale))}</p>\n'
        f'<div id="{view_id}" style="margin: 15px 0;"></div>\n'
        f"<script>{circuitsvis_bundle()}\n"
        f"CircuitsVis.render({json.dumps(view_id)}, CircuitsVis.AttentionHeads, {_json_for_script(props)});</script>"
    )
    return StepMapsView(page, page)
