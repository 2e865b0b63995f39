"""Step maps as graphs other tools open: a networkx ``DiGraph`` (and GraphML through
networkx), and Thought Anchors' ``step_importance.json``.

Edges point the way information flows: from the key step ``k`` that is read to the
query step ``q`` that reads it, so the edge ``k -> q`` carries ``M_l[q, k]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import networkx as nx
import numpy as np

from ..errors import StepflowError
from ..viz.stepmaps import StepMapResult
from .diagnostics import band_layers


def _texts(result: StepMapResult, texts: Optional[Sequence[str]]) -> list:
    if texts is None:
        return list(result.step_labels)
    texts = list(texts)
    if len(texts) != result.maps.shape[-1]:
        raise StepflowError(f"texts has {len(texts)} entries for {result.maps.shape[-1]} steps; pass one per step "
                            "(e.g. [s.text for s in trace.steps])")
    return texts


def to_networkx(result: StepMapResult, texts: Optional[Sequence[str]] = None) -> nx.DiGraph:
    """A ``DiGraph`` of the steps of ``result`` (a `StepSaliency` or any `StepMapResult`).

    Nodes ``0..n-1``: ``kind``, ``label`` and ``text`` (``texts[i]``, default the label).
    Edges ``k -> q`` for every pair with a non-zero value in some layer: ``layer_<l>`` (the
    map of model layer ``l``), ``band_<name>`` (the mean of the computed layers of each
    diagnostics band, where the band has computed layers) and ``weight`` (the mean over
    computed layers). Graph attributes: ``map_kind``, ``pool``, ``loss``, ``rule`` and
    ``layers`` (comma-separated, so that GraphML can hold them).
    """
    maps = np.asarray(result.maps, dtype=np.float64)
    layers = [int(l) for l in result.layers]
    n_model = int(getattr(result, "n_model_layers", max(layers) + 1))
    bands = {name: [layers.index(l) for l in members if l in layers]
             for name, members in band_layers(n_model).items()}
    band_maps = {name: maps[rows].mean(0) for name, rows in bands.items() if rows}
    mean = maps.mean(0)
    graph = nx.DiGraph(map_kind=result.map_kind, pool=result.pool, loss=result.loss,
                       rule=getattr(result, "rule", "abs"), layers=",".join(map(str, layers)))
    for i, (kind, label, text) in enumerate(zip(result.step_kinds, result.step_labels, _texts(result, texts))):
        graph.add_node(i, kind=kind, label=label, text=text)
    q_idx, k_idx = np.nonzero((maps != 0).any(0))
    for q, k in zip(q_idx.tolist(), k_idx.tolist()):
        attrs = {f"layer_{l}": float(maps[row, q, k]) for row, l in enumerate(layers)}
        attrs.update({f"band_{name}": float(m[q, k]) for name, m in band_maps.items()})
        graph.add_edge(k, q, weight=float(mean[q, k]), **attrs)
    return graph


def write_graphml(result: StepMapResult, path: Union[str, Path], texts: Optional[Sequence[str]] = None) -> Path:
    """`to_networkx` written as GraphML (``networkx.write_graphml``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(to_networkx(result, texts), path)
    return path


def step_importance_records(matrix, texts: Sequence[str]) -> list:
    """Thought Anchors' ``step_importance.json`` content for ``matrix[i, j]`` = the
    importance of step ``i`` for a later step ``j``: one record per source step,
    ``{source_chunk_idx, source_chunk_text, target_impacts: [{target_chunk_idx,
    importance_score}, ...]}`` with the targets ``j > i`` (as their ``step_attribution.py``
    writes it)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.shape != (n, n) or len(texts) != n:
        raise StepflowError(f"expected a square matrix with one text per step, got {matrix.shape} and {len(texts)} texts")
    return [{"source_chunk_idx": i, "source_chunk_text": str(texts[i]),
             "target_impacts": [{"target_chunk_idx": j, "importance_score": float(matrix[i, j])}
                                for j in range(i + 1, n)]}
            for i in range(n)]


def write_step_importance(result: StepMapResult, path: Union[str, Path], texts: Optional[Sequence[str]] = None,
                          *, layers: Optional[Sequence[int]] = None) -> Path:
    """``step_importance.json`` of a step map: the importance of step ``i`` for a later
    step ``j`` is ``M[j, i]`` (how much ``j`` draws on ``i``), averaged over ``layers``
    (default every computed layer; e.g. ``band_layers(n)["deep"]``)."""
    maps = np.asarray(result.maps, dtype=np.float64)
    computed = [int(l) for l in result.layers]
    chosen = computed if layers is None else [int(l) for l in layers]
    missing = sorted(set(chosen) - set(computed))
    if missing or not chosen:
        raise StepflowError(f"layers {missing or chosen} were not computed; have {computed}")
    mean = maps[[computed.index(l) for l in chosen]].mean(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(step_importance_records(mean.T, _texts(result, texts)), indent=2))
    return path
