"""`StepSaliency`: the step maps of one trace, the result type of every way this package
computes them, with its persistence (``.npz`` arrays plus ``.json`` metadata, no pickle)
and its views (pandas, diagnostics, HTML, circuitsvis)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from ..errors import StepflowError
from ..traces.formats import STEP_KINDS
from ..viz.report import save_result_html
from ..viz.stepmaps import StepMapsView, step_maps_view
from .diagnostics import METRIC_LEGEND, Diagnostics, band_layers, diagnose
from .graph import to_networkx, write_graphml, write_step_importance
from .rules import RULES

_FORMAT_VERSION = 1

# The shapes of the maps on public signatures (TransformerLens's jaxtyping style).
StepMaps = Float[torch.Tensor, "layer step_q step_k"]
HeadStepMaps = Float[torch.Tensor, "layer head step_q step_k"]
StepMap = Float[torch.Tensor, "step_q step_k"]


@dataclass
class StepSaliency:
    """Step maps of one trace.

    Attributes:
        maps: ``[layer, step_q, step_k]`` float64, mean over heads.
        layers: model layer index of each row of ``maps``.
        n_model_layers: layers in the model (the diagnostics' bands are fractions of it).
        step_kinds, step_labels: per step (``"question"``/``"thinking"``/``"summary"``).
        map_kind: ``"saliency"`` (A and dL/dA, combined by ``rule``) or ``"attention"`` (A).
        pool: ``"mean"``, ``"causal_mean"`` (or ``"mass"`` for attention).
        loss: the loss the gradient came from (``""`` for attention maps; ``"logit"``: one
            logit, named in ``meta["target"]`` as ``[position, token_id]``).
        rule: ``"abs"`` (|A x dL/dA|, the paper), ``"signed"`` (A x dL/dA: the only maps
            that may be negative) or ``"grad"`` (|dL/dA| where A > 0); `stepflow_tl.saliency.rules`.
        head_maps: ``[layer, head, step_q, step_k]`` when asked for, else None.
        meta: JSON-safe details (model, trace id, label, ...).
    """

    maps: StepMaps
    layers: List[int]
    n_model_layers: int
    step_kinds: List[str]
    step_labels: List[str]
    map_kind: str = "saliency"
    pool: str = "mean"
    loss: str = "sequence"
    head_maps: Optional[HeadStepMaps] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    rule: str = "abs"

    @property
    def n_steps(self) -> int:
        return self.maps.shape[-1]

    def row_normalised(self) -> StepMaps:
        """``[layer, step_q, step_k]`` with each row summing to 1 (zero rows stay 0), for display."""
        sums = self.maps.sum(-1, keepdim=True)
        return torch.where(sums > 0, self.maps / torch.where(sums > 0, sums, 1), 0.0)

    def layer(self, layer: int) -> StepMap:
        """The ``[step_q, step_k]`` map of model layer ``layer``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not computed; have {self.layers}")
        return self.maps[self.layers.index(layer)]

    def to_dataframe(self):
        """Long format: layer, step_q, step_k, kind_q, kind_k, label_q, label_k, value."""
        n_layers, n_q, n_k = self.maps.shape
        layer_idx, q_idx, k_idx = np.meshgrid(
            np.arange(n_layers), np.arange(n_q), np.arange(n_k), indexing="ij"
        )
        kinds = np.asarray(self.step_kinds, dtype=object)
        labels = np.asarray(self.step_labels, dtype=object)
        return pd.DataFrame(
            {
                "layer": np.asarray(self.layers)[layer_idx.ravel()],
                "step_q": q_idx.ravel(),
                "step_k": k_idx.ravel(),
                "kind_q": kinds[q_idx.ravel()],
                "kind_k": kinds[k_idx.ravel()],
                "label_q": labels[q_idx.ravel()],
                "label_k": labels[k_idx.ravel()],
                "value": self.maps.numpy().ravel(),
                "map_kind": self.map_kind,
            }
        )

    # ------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``path`` (.npz, arrays) and ``path`` with .json (metadata). No pickle."""
        path = Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"maps": self.maps.numpy()}
        if self.head_maps is not None:
            arrays["head_maps"] = self.head_maps.numpy()
        np.savez_compressed(path, **arrays)
        meta = {
            "format_version": _FORMAT_VERSION,
            "layers": list(map(int, self.layers)),
            "n_model_layers": int(self.n_model_layers),
            "step_kinds": list(self.step_kinds),
            "step_labels": list(self.step_labels),
            "map_kind": self.map_kind,
            "pool": self.pool,
            "loss": self.loss,
            "rule": self.rule,
            "meta": self.meta,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "StepSaliency":
        """Read what `save` wrote, checking that it is one consistent map: shapes, layer
        indices, step kinds and labels, dtypes and finite non-negative values. Anything
        else is a `StepflowError` naming the file, not NaN diagnostics later."""
        path = Path(path).with_suffix(".npz")
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StepflowError(f"{meta_path} is missing (StepSaliency.save writes .npz and .json side by side)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StepflowError(f"{meta_path} is not a readable StepSaliency metadata file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
            raise StepflowError(f"{meta_path}: unknown format version "
                                f"{meta.get('format_version') if isinstance(meta, dict) else None}")
        missing = [k for k in ("layers", "n_model_layers", "step_kinds", "step_labels", "map_kind", "pool", "loss",
                               "meta") if k not in meta]
        if missing:
            raise StepflowError(f"{meta_path} lacks the keys {missing}; not written by StepSaliency.save?")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "maps" not in data:
                    raise StepflowError(f"{path} has no 'maps' array (has {sorted(data.files)})")
                maps = data["maps"].copy()
                head_maps = data["head_maps"].copy() if "head_maps" in data else None
        except FileNotFoundError:
            raise StepflowError(f"{path} is missing (StepSaliency.save writes .npz and .json side by side)") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise StepflowError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
        _check_loaded(path, meta, maps, head_maps)
        return cls(
            maps=torch.from_numpy(maps),
            layers=meta["layers"],
            n_model_layers=meta["n_model_layers"],
            step_kinds=meta["step_kinds"],
            step_labels=meta["step_labels"],
            map_kind=meta["map_kind"],
            pool=meta["pool"],
            loss=meta["loss"],
            head_maps=None if head_maps is None else torch.from_numpy(head_maps),
            meta=meta["meta"],
            rule=meta.get("rule", "abs"),  # files from before rules existed hold |A x dL/dA|
        )

    # ------------------------------------------------------------ export
    def to_networkx(self, texts: Optional[List[str]] = None):
        """A networkx ``DiGraph``: steps as nodes (kind, label, text), edges ``k -> q``
        with per-layer, per-band and mean weights (`stepflow_tl.saliency.graph.to_networkx`)."""
        return to_networkx(self, texts)

    def save_graphml(self, path: Union[str, Path], texts: Optional[List[str]] = None) -> Path:
        """`to_networkx` as a GraphML file (Gephi, Cytoscape, yEd, ...)."""
        return write_graphml(self, path, texts)

    def save_step_importance(self, path: Union[str, Path], texts: Optional[List[str]] = None,
                             layers: Optional[List[int]] = None) -> Path:
        """Thought Anchors' ``step_importance.json`` (importance of step i for a later step
        j = ``M[j, i]``, mean over ``layers``; `stepflow_tl.saliency.graph.write_step_importance`)."""
        return write_step_importance(self, path, texts, layers=layers)

    # ------------------------------------------------------------ analysis & display
    def diagnose(self, **kwargs: Any) -> Diagnostics:
        """The failure diagnostics of this map (`stepflow_tl.saliency.diagnostics.diagnose`)."""
        return diagnose(self, **kwargs)

    def save_html(self, path: Union[str, Path], **kwargs: Any) -> Path:
        """A self-contained HTML page with the step maps and diagnostics (keyword arguments go
        to `stepflow_tl.viz.report.save_result_html`; its metric legend is `METRIC_LEGEND`)."""
        kwargs.setdefault("legend", METRIC_LEGEND)
        return save_result_html(self, path, **kwargs)

    def show(self, *, view: Optional[str] = None, bands: bool = False,
             row_normalise: Optional[bool] = None) -> StepMapsView:
        """The circuitsvis view of all layers, for a notebook: a ``circuitsvis`` ``RenderedHTML``
        whose page inlines the installed circuitsvis bundle, so it displays offline
        (`stepflow_tl.viz.stepmaps.step_maps_view`). view: how cells become colours
        (`stepflow_tl.viz.stepmaps.VIEWS`, default each cell's share of its row on a log scale);
        bands: one panel per diagnostics band (`band_layers`) instead of one per layer.
        row_normalise is deprecated (True is ``view="row"``, False ``view="global"``)."""
        return step_maps_view(self, view=view, row_normalise=row_normalise,
                              bands=band_layers(self.n_model_layers) if bands else None)


def _check_loaded(path: Path, meta: dict, maps: np.ndarray, head_maps: Optional[np.ndarray]) -> None:
    """Raise `StepflowError` naming ``path`` unless the arrays and metadata of a saved
    `StepSaliency` agree with each other."""
    def bad(what: str):
        raise StepflowError(f"{path}: {what}; the file is damaged or was not written by StepSaliency.save")

    if maps.dtype.kind != "f" or maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        bad(f"maps must be a float [layer, step, step] array, got {maps.dtype} {maps.shape}")
    n_layers, n_steps = maps.shape[0], maps.shape[1]
    rule = meta.get("rule", "abs")
    if rule not in RULES:
        bad(f"rule must be one of {RULES}, got {rule!r}")
    if not np.isfinite(maps).all() or (rule != "signed" and (maps < 0).any()):
        bad("maps hold NaN, infinite or negative values (only rule='signed' maps may be negative)")
    layers, n_model = meta["layers"], meta["n_model_layers"]
    if not isinstance(n_model, int) or isinstance(n_model, bool) or n_model < 1:
        bad(f"n_model_layers must be a positive integer, got {n_model!r}")
    if (not isinstance(layers, list) or len(layers) != n_layers or len(set(map(str, layers))) != len(layers)
            or not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < n_model for l in layers)):
        bad(f"layers {layers!r} must be {n_layers} distinct layer indices in [0, {n_model}) (one per map)")
    kinds, labels = meta["step_kinds"], meta["step_labels"]
    if not isinstance(kinds, list) or len(kinds) != n_steps or not set(kinds) <= set(STEP_KINDS):
        bad(f"step_kinds must be {n_steps} of {'/'.join(STEP_KINDS)} (one per step), got {kinds!r:.120}")
    if not isinstance(labels, list) or len(labels) != n_steps or not all(isinstance(s, str) for s in labels):
        bad(f"step_labels must be {n_steps} strings (one per step), got {len(labels) if isinstance(labels, list) else labels!r}")
    for key in ("map_kind", "pool", "loss"):
        if not isinstance(meta[key], str):
            bad(f"{key} must be a string, got {meta[key]!r}")
    if not isinstance(meta["meta"], dict):
        bad(f"meta must be a JSON object, got {type(meta['meta']).__name__}")
    if head_maps is not None and (head_maps.dtype.kind != "f" or head_maps.ndim != 4
                                  or head_maps.shape[0] != n_layers or head_maps.shape[2:] != (n_steps, n_steps)):
        bad(f"head_maps must be a float [{n_layers}, head, {n_steps}, {n_steps}] array, got {head_maps.dtype} "
            f"{head_maps.shape}")
