"""Issue 25 (receiver heads): vertical scores and kurtosis of every head at step level,
against an independent computation written as Thought Anchors describe it (loops, NaN
masks, the kurtosis formula by hand) on transformers' own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import hf_attention_and_grads, pool_loop

from stepflow_tl import StepflowError
from stepflow_tl.saliency.compute import step_attention
from stepflow_tl.saliency.receivers import mean_kurtosis, receiver_heads
from stepflow_tl.tl.models import make_tiny_hf
from stepflow_tl.traces.trace import Trace
from stepflow_tl.viz import Report, plot_receiver_heads


@pytest.fixture(scope="module")
def trace(tokenizer):
    thinking = "\n\n".join(f"Step {i}: add {i} to the total and check it." for i in range(1, 11))
    return Trace.from_parts(tokenizer, "Add the numbers one to ten.", thinking, "The total is 55.")


def _reference(trace, k, kinds):
    hf = make_tiny_hf(n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, seed=0)
    steps = [i for i, kind in enumerate(trace.step_kinds) if kind in kinds]
    vertical, kurt = [], []
    for a, _ in hf_attention_and_grads(hf, trace.token_ids):
        pooled = pool_loop(a, trace.token_steps, trace.n_steps, "mean").numpy()
        layer_v, layer_k = [], []
        for head in pooled:
            m = head[np.ix_(steps, steps)].copy()
            n = len(steps)
            for i in range(n):
                for j in range(n):
                    if i - j < k:  # the future, the step itself and its k - 1 nearest followers
                        m[i, j] = np.nan
            v = np.array([np.nanmean(m[j + k:, j]) if j + k < n else np.nan for j in range(n)])
            x = v[~np.isnan(v)]
            d = x - x.mean()
            layer_v.append(v)
            layer_k.append((d ** 4).mean() / (d ** 2).mean() ** 2 - 3.0)
        vertical.append(layer_v)
        kurt.append(layer_k)
    return np.array(vertical), np.array(kurt), steps


@pytest.mark.parametrize("k", [1, 4])
def test_vertical_scores_and_kurtosis_match_an_independent_computation(tiny_model, trace, k):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of the last steps' empty columns
        vertical, kurt, steps = _reference(trace, k, ("thinking", "summary"))
    result = receiver_heads(tiny_model, trace, proximity_ignore=k)
    assert result.steps == steps and result.n_kv_heads == 2
    assert np.allclose(result.vertical, vertical, rtol=1e-5, atol=1e-9, equal_nan=True)
    assert np.isnan(result.vertical[..., -k:]).all()
    assert np.allclose(result.kurtosis, kurt, rtol=1e-4, atol=1e-6)
    ranked = result.ranked()
    assert len(ranked) == 12 and ranked["kurtosis"].is_monotonic_decreasing
    best = ranked.iloc[0]
    assert best["kurtosis"] == pytest.approx(kurt.max(), rel=1e-4)
    assert best["kv_group"] == best["head"] // 2
    # pooled per KV group: the mean vertical score of its two query heads, then the kurtosis
    groups = result.groups()
    row = groups.iloc[0]
    layer = result.layers.index(int(row["layer"]))
    pooled = vertical[layer, 2 * int(row["kv_group"]):2 * int(row["kv_group"]) + 2].mean(0)
    x = pooled[~np.isnan(pooled)]
    d = x - x.mean()
    assert row["kurtosis"] == pytest.approx((d ** 4).mean() / (d ** 2).mean() ** 2 - 3.0, rel=1e-4)
    top = result.top_heads(3)
    expected = np.mean([vertical[l, h] for l, h in top], axis=0)
    assert np.allclose(result.step_scores(3), expected, rtol=1e-5, equal_nan=True)
    frame = result.to_dataframe(3)
    assert list(frame["step"]) == steps


def test_from_a_step_attention_result_and_mean_over_traces(tiny_bridge, trace):
    attention = step_attention(tiny_bridge, trace, pool="mean", per_head=True)
    a = receiver_heads(attention, n_kv_heads=2)
    b = receiver_heads(tiny_bridge, trace)
    assert np.allclose(a.kurtosis, b.kurtosis, equal_nan=True)
    ranked = mean_kurtosis([a, b])
    assert ranked.iloc[0]["kurtosis"] == pytest.approx(np.nanmax(a.kurtosis))


def test_picture_in_a_report(tiny_bridge, trace, tmp_path):
    result = receiver_heads(tiny_bridge, trace, proximity_ignore=2)
    importance = np.full(len(result.steps), np.nan)
    importance[:3] = [0.1, -0.2, 0.3]
    fig = plot_receiver_heads(result.kurtosis, result.layers, result.step_scores(4), result.step_labels,
                              importance=importance)
    path = Report("receivers").add_figure(fig, caption="receiver heads").save(tmp_path / "r.html")
    assert "receiver heads" in path.read_text()


def test_bad_input(tiny_bridge, trace, tokenizer):
    with pytest.raises(StepflowError, match="proximity_ignore must be"):
        receiver_heads(tiny_bridge, trace, proximity_ignore=0)
    with pytest.raises(StepflowError, match="per_head=True"):
        receiver_heads(step_attention(tiny_bridge, trace))
    short = Trace.from_parts(tokenizer, "Q?", "One.\n\nTwo.", "Done.")
    with pytest.raises(StepflowError, match="fewer than two vertical scores"):
        receiver_heads(tiny_bridge, short)


def test_cli_receiver_heads(tmp_path, capsys):
    import json

    import pandas as pd

    from stepflow_tl.cli.main import main

    thinking = "\n\n".join(f"Step {i}: add {i} to the total." for i in range(1, 9))
    record = {"question": "Add one to eight.", "output": thinking + "\n</think>\n\nThe total is 36."}
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    assert main(["saliency", str(traces), "--model", "tiny", "--receiver-heads", "--proximity-ignore", "2",
                 "--out", str(out)]) == 0
    ranked = pd.read_csv(out / "receiver_heads.csv")
    assert {"layer", "head", "kv_group", "kurtosis", "rank"} <= set(ranked.columns)
    assert len(pd.read_csv(out / "trace0000.receiver_scores.csv")) == 9
    html = (out / "report.html").read_text()
    assert "Receiver heads: kurtosis" in html and "receiver score" in html
    assert main(["saliency", str(traces), "--model", "tiny", "--proximity-ignore", "2",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "--proximity-ignore has no effect without --receiver-heads" in capsys.readouterr().err
