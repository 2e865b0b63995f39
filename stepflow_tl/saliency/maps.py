"""`StepSaliency`: the step maps of one trace, the result type of every way this package
computes them, with its persistence (``.npz`` arrays plus ``.json`` metadata, no pickle)
and its views (pandas, diagnostics, HTML, circuitsvis)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Float

from ..errors import StepflowError
from ..viz.report import save_result_html
from ..viz.stepmaps import StepMapsView, step_maps_view
from .diagnostics import Diagnostics, diagnose

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
        map_kind: ``"saliency"`` (|A x dL/dA|) or ``"attention"`` (A).
        pool: ``"mean"``, ``"causal_mean"`` (or ``"mass"`` for attention).
        loss: the loss the gradient came from (``""`` for attention maps).
        head_maps: ``[layer, head, step_q, step_k]`` when asked for, else None.
        meta: JSON-safe details (model, trace id, label, ...).
    """

    maps: StepMaps
    layers: list
    n_model_layers: int
    step_kinds: list
    step_labels: list
    map_kind: str = "saliency"
    pool: str = "mean"
    loss: str = "sequence"
    head_maps: Optional[HeadStepMaps] = None
    meta: dict = field(default_factory=dict)

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
        import pandas as pd

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
            "meta": self.meta,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "StepSaliency":
        path = Path(path).with_suffix(".npz")
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise StepflowError(f"{path}: unknown format version {meta.get('format_version')}")
        with np.load(path, allow_pickle=False) as data:
            maps = torch.from_numpy(data["maps"].copy())
            head_maps = torch.from_numpy(data["head_maps"].copy()) if "head_maps" in data else None
        return cls(
            maps=maps,
            layers=meta["layers"],
            n_model_layers=meta["n_model_layers"],
            step_kinds=meta["step_kinds"],
            step_labels=meta["step_labels"],
            map_kind=meta["map_kind"],
            pool=meta["pool"],
            loss=meta["loss"],
            head_maps=head_maps,
            meta=meta["meta"],
        )

    # ------------------------------------------------------------ analysis & display
    def diagnose(self, **kwargs) -> Diagnostics:
        """The failure diagnostics of this map (`stepflow_tl.saliency.diagnostics.diagnose`)."""
        return diagnose(self, **kwargs)

    def save_html(self, path: Union[str, Path], **kwargs) -> Path:
        """A self-contained HTML page with the step maps and diagnostics."""
        return save_result_html(self, path, **kwargs)

    def show(self, *, row_normalise: bool = False) -> StepMapsView:
        """The circuitsvis view of all layers on one colour scale, for a notebook: a
        ``circuitsvis`` ``RenderedHTML`` whose page inlines the installed circuitsvis
        bundle, so it displays offline (`stepflow_tl.viz.stepmaps.step_maps_view`)."""
        return step_maps_view(self, row_normalise=row_normalise)
