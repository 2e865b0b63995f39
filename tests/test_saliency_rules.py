"""Issue 25 (item 1): the authors' attribution rules (|A g|, A g, |g|) and their logit
target, in every mode and on both backends, exact against the independent reference."""

from __future__ import annotations

import pytest
import torch
from conftest import apples_trace, rel_error
from reference import reference_saliency

from stepflow_tl import StepflowError
from stepflow_tl.saliency.compute import step_saliency, step_saliency_from_cache
from stepflow_tl.saliency.losses import answer_token_positions
from stepflow_tl.saliency.maps import StepSaliency
from stepflow_tl.saliency.rules import LogitTarget, parse_target


@pytest.fixture(scope="module")
def trace(tokenizer):
    return apples_trace(tokenizer)


def _answer_logit(trace):
    first = int(answer_token_positions(trace).min())
    return first - 1, int(trace.token_ids[first])


MODES, RULES, SCALARS = ["dense", "bounded", "tiled"], ["abs", "signed", "grad"], ["sequence", "logit", "answer-logit"]
# A Latin square: every mode meets every rule and every scalar, in 9 cases rather than 27.
CASES = [(m, r, SCALARS[(i + j) % 3]) for i, m in enumerate(MODES) for j, r in enumerate(RULES)]


@pytest.mark.parametrize("mode, rule, scalar", CASES)
def test_rules_and_targets_match_the_reference(tiny_model, reference_hf, trace, mode, rule, scalar):
    if scalar == "sequence":
        kwargs, logit = {"loss": "sequence"}, None
    elif scalar == "logit":
        logit = (40, 123)
        kwargs = {"loss": "logit", "target": LogitTarget(*logit)}
    else:
        logit = _answer_logit(trace)
        kwargs = {"loss": "logit"}
    expected = reference_saliency(reference_hf, trace, "mean", rule=rule, logit=logit)
    result = step_saliency(tiny_model, trace, mode=mode, rule=rule, **kwargs)
    assert result.rule == rule
    # signed values cancel in the pooled sums, so fp32 rounding shows more against the largest cell
    assert rel_error(result.maps, expected) < (1e-5 if rule == "signed" else 1e-6)
    if rule == "signed":
        assert (result.maps < 0).any() and (result.maps > 0).any()
    else:
        assert (result.maps >= 0).all()
    if logit is not None:
        assert result.loss == "logit" and result.meta["target"] == list(logit)


def test_default_is_unchanged_and_per_head_signed_maps(tiny_model, reference_hf, trace):
    """rule='abs' is the default and gives the maps of before; signed per-head maps
    match the reference head by head (the head mean of signed values can cancel)."""
    plain = step_saliency(tiny_model, trace, mode="bounded")
    assert torch.equal(plain.maps, step_saliency(tiny_model, trace, mode="bounded", rule="abs").maps)
    heads = step_saliency(tiny_model, trace, rule="signed", per_head=True, mode="tiled")
    expected = reference_saliency(reference_hf, trace, rule="signed", per_head=True)
    assert rel_error(heads.head_maps, expected) < 1e-5


def test_rules_from_a_cache(tiny_bridge, trace):
    tokens = trace.token_ids[None]
    _, cache = tiny_bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                          names_filter=lambda n: n.endswith("hook_pattern"))
    # incl_bwd's backward leaves parameter gradients on the shared model; later tests check none are left
    tiny_bridge.zero_grad(set_to_none=True)
    for rule in ("signed", "grad"):
        direct = step_saliency(tiny_bridge, trace, rule=rule)
        cached = step_saliency_from_cache(cache, trace, rule=rule)
        assert rel_error(cached.maps, direct.maps) < 1e-6


def test_signed_maps_save_and_load(tiny_bridge, trace, tmp_path):
    result = step_saliency(tiny_bridge, trace, rule="signed", loss="logit")
    back = StepSaliency.load(result.save(tmp_path / "signed"))
    assert back.rule == "signed" and torch.equal(back.maps, result.maps)
    assert back.meta["target"] == result.meta["target"]


def test_bad_rules_and_targets_are_one_line_errors(tiny_bridge, trace):
    n = trace.token_ids.shape[0]
    vocab = tiny_bridge.cfg.d_vocab_out
    cases = [
        (dict(rule="ag"), "rule must be one of"),
        (dict(loss="logit", target=(n, 5)), "position"),
        (dict(loss="logit", target=(-1, 5)), "position"),
        (dict(loss="logit", target=(3, vocab)), "token id"),
        (dict(loss="logit", target="first"), "target must be"),
        (dict(loss="sequence", target=(3, 5)), "takes no target"),
        (dict(loss="xent"), "loss must be one of"),
    ]
    for kwargs, words in cases:
        with pytest.raises(StepflowError, match=words) as info:
            step_saliency(tiny_bridge, trace, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(StepflowError, match="POSITION:TOKEN_ID"):
        parse_target("12")
    assert parse_target("12:7") == LogitTarget(12, 7)


def test_cli_rule_and_logit_target(tmp_path, capsys):
    import json

    import pandas as pd

    from stepflow_tl.cli.main import main

    record = {"question": "Sam has 2 pens and buys 3 more. How many?",
              "output": "He has 2.\n\nHe buys 3, so 5.\n\nCheck: 5 - 3 = 2.\n</think>\n\nAnswer: \\boxed{5}"}
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    assert main(["saliency", str(traces), "--model", "tiny", "--rule", "signed", "--loss", "logit",
                 "--export", "graphml", "step_importance", "--out", str(out)]) == 0
    assert (out / "trace0000.graphml").exists()
    records = json.loads((out / "trace0000.step_importance.json").read_text())
    assert records[1]["source_chunk_text"].startswith("He has 2.")
    saved = StepSaliency.load(out / "trace0000")
    assert saved.rule == "signed" and saved.loss == "logit" and (saved.maps < 0).any()
    assert pd.read_csv(out / "metrics.csv")["rule"].tolist() == ["signed"]
    assert "rule=signed" in (out / "report.html").read_text()
    assert main(["saliency", str(traces), "--model", "tiny", "--target", "3:7", "--out", str(tmp_path / "o2")]) == 2
    assert "--target has no effect with --loss sequence" in capsys.readouterr().err
    assert main(["saliency", str(traces), "--model", "tiny", "--loss", "logit", "--target", "3",
                 "--out", str(tmp_path / "o3")]) == 2
    assert "POSITION:TOKEN_ID" in capsys.readouterr().err
    assert main(["saliency", str(traces), "--model", "tiny", "--loss", "logit", "--target", "9999:7",
                 "--out", str(tmp_path / "o4")]) == 2
    assert "outside the trace" in capsys.readouterr().err
