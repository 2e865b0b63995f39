"""Issue 25 (export): step maps as a networkx graph, GraphML and Thought Anchors'
step_importance.json, checked against the maps they come from."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from stepflow_tl import StepflowError
from stepflow_tl.saliency.graph import step_importance_records
from stepflow_tl.saliency.maps import StepSaliency


@pytest.fixture
def result():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 5, 5, generator=g, dtype=torch.float64).tril()
    maps[:, 3, 1] = 0.0  # a pair with no value in any layer: no edge
    return StepSaliency(maps=maps, layers=[0, 1, 2, 3], n_model_layers=4,
                        step_kinds=["question", "thinking", "thinking", "thinking", "summary"],
                        step_labels=[f"S{i}" for i in range(5)])


def test_networkx_graph_holds_the_maps(result):
    texts = [f"text of step {i}" for i in range(5)]
    graph = result.to_networkx(texts)
    assert isinstance(graph, nx.DiGraph) and graph.number_of_nodes() == 5
    assert graph.nodes[4] == {"kind": "summary", "label": "S4", "text": "text of step 4"}
    assert not graph.has_edge(1, 3) and not graph.has_edge(3, 1)
    assert graph.number_of_edges() == 15 - 1  # lower triangle with diagonal, less the zero pair
    edge = graph.edges[1, 4]  # key step 1 read by query step 4
    for l in range(4):
        assert edge[f"layer_{l}"] == float(result.maps[l, 4, 1])
    assert edge["weight"] == pytest.approx(float(result.maps[:, 4, 1].mean()))
    assert edge["band_shallow"] == float(result.maps[0, 4, 1])  # 4 layers: shallow = [0], deep = [3]
    assert edge["band_middle"] == pytest.approx(float(result.maps[1:3, 4, 1].mean()))
    assert graph.graph["layers"] == "0,1,2,3" and graph.graph["rule"] == "abs"


def test_graphml_round_trip(result, tmp_path):
    path = result.save_graphml(tmp_path / "g.graphml")
    back = nx.read_graphml(path, node_type=int)
    assert back.nodes[2]["kind"] == "thinking" and back.edges[0, 2]["layer_3"] == float(result.maps[3, 2, 0])


def test_step_importance_json_is_thought_anchors_format(result, tmp_path):
    records = json.loads(result.save_step_importance(tmp_path / "step_importance.json", layers=[3]).read_text())
    assert [r["source_chunk_idx"] for r in records] == list(range(5))
    first = records[1]
    assert first["source_chunk_text"] == "S1"
    assert [t["target_chunk_idx"] for t in first["target_impacts"]] == [2, 3, 4]
    assert first["target_impacts"][2]["importance_score"] == float(result.maps[3, 4, 1])
    assert records[4]["target_impacts"] == []
    with pytest.raises(StepflowError, match="not computed"):
        result.save_step_importance(tmp_path / "x.json", layers=[7])
    with pytest.raises(StepflowError, match="one per step"):
        result.to_networkx(["too", "few"])
    with pytest.raises(StepflowError, match="square matrix"):
        step_importance_records([[1.0, 2.0]], ["a"])
