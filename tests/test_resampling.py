"""Issue 25 (resampling importance): N continuations from before and after each thinking
step, graded, compared; resumable through the study results file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import sum_trace

from stepflow_tl import StepflowError
from stepflow_tl.study.problems import Problem
from stepflow_tl.study.resampling import _summarise, load_resampling, resampling_importance
from stepflow_tl.study.run import item_seed


@pytest.fixture(scope="module")
def trace(tokenizer):
    return sum_trace(tokenizer)


PROBLEM = Problem(id="sum", question="What is 3 + 4?", answer="7", kind="integer")


def test_runs_resumes_and_replays(tiny_bridge, trace, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    kwargs = dict(n_samples=3, max_new_tokens=4, seed=5)
    first = resampling_importance(tiny_bridge, trace, PROBLEM, results_path=path, **kwargs)
    n = sum(k == "thinking" for k in trace.step_kinds)
    assert len(first.steps) == n and len(first.rollouts) == (n + 1) * 3
    assert list(first.rollouts["seed"]) == [item_seed(5, g) for g in range((n + 1) * 3)]
    acc = first.rollouts.groupby("prefix")["correct"].mean().to_numpy()
    assert np.allclose(first.importance("importance_accuracy"), acc[1:] - acc[:-1])
    # an interrupted run: keep the header and 4 rollouts, resume, get the same rollouts
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]))
    again = resampling_importance(tiny_bridge, trace, PROBLEM, results_path=path, **kwargs)
    assert list(again.rollouts["output"]) == list(first.rollouts["output"])
    assert list(load_resampling(path, trace).rollouts["seed"]) == list(first.rollouts["seed"])
    with pytest.raises(StepflowError, match="different config"):
        resampling_importance(tiny_bridge, trace, PROBLEM, results_path=path, n_samples=2, max_new_tokens=4)


def test_importance_kl_and_matrix_from_known_rollouts(trace):
    thinking = [s for s in trace.steps if s.kind == "thinking"]
    n = len(thinking)
    texts = [s.text for s in thinking]

    def record(p, sample, correct, answer, output):
        return {"condition": f"prefix{p}", "sample": sample, "seed": 0, "correct": correct, "extracted": answer,
                "output": output}

    records = []
    for p in range(n + 1):
        for s in range(2):
            good = p >= 2 or s == 0
            # with step 1 kept (prefix >= 2) every continuation restates the last step
            output = ("\n\n".join([texts[-1]]) if p >= 2 else "something else entirely") + "\n</think>\n\nok"
            records.append(record(p, s, good, "7" if good else None, output))
    result = _summarise(records, trace, thinking, 2, 0.8, {})
    imp = result.importance("importance_accuracy")
    assert imp[0] == 0.0 and imp[1] == 0.5 and all(imp[2:] == 0.0)
    # prefix 1 -> answers {7, none}, prefix 2 -> {7, 7}; Laplace alpha=1 over {7, none}
    p = {"7": 2 / 4, "none": 2 / 4}
    q = {"7": 3 / 4, "none": 1 / 4}
    assert result.importance("importance_kl")[1] == pytest.approx(sum(p[a] * math.log(p[a] / q[a]) for a in p))
    assert result.matrix[1, n - 1] == 1.0 and result.matrix[0, n - 1] == 0.0
    assert np.allclose(np.tril(result.matrix), 0.0)


def test_bad_input(tiny_bridge, trace):
    with pytest.raises(StepflowError, match="n_samples"):
        resampling_importance(tiny_bridge, trace, PROBLEM, n_samples=1)
    with pytest.raises(StepflowError, match="temperature"):
        resampling_importance(tiny_bridge, trace, PROBLEM, temperature=0.0)


def test_cli_resample(tmp_path, capsys):
    import json

    import pandas as pd

    from stepflow_tl.cli.main import main

    record = {"question": "What is 3 + 4?", "gold": "7",
              "output": "First add.\n\nThen check.\n\nIt is 7.\n</think>\n\nAnswer: \\boxed{7}"}
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out"
    assert main(["resample", str(traces), "--model", "tiny", "--n-samples", "2", "--max-new-tokens", "3",
                 "--proximity-ignore", "1", "--no-progress", "--out", str(out)]) == 0
    steps = pd.read_csv(out / "importance.csv")
    assert len(steps) == 3 and {"importance_accuracy", "importance_kl"} <= set(steps.columns)
    assert json.loads((out / "step_importance.json").read_text())[0]["source_chunk_idx"] == 0
    html = (out / "report.html").read_text()
    assert "resampling importance" in html and "Step-Saliency of the trace" in html
    assert main(["resample", str(traces), "--model", "tiny", "--n-samples", "1", "--out", str(tmp_path / "o2")]) == 2
    assert "--n-samples must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_validate_agreement_with_resampling(tiny_bridge, tokenizer, tmp_path):
    """validate(resampling=N): per thinking step, the cheap signals and the importance are
    stored, and each rho is Spearman's rho of the stored values."""
    from stepflow_tl.stats import spearman
    from stepflow_tl.study.validate import ValidationConfig, validate
    from stepflow_tl.traces.trace import Trace

    thinking = "\n\n".join(["First add the two numbers.", "Then carry the one.", "Check the sum again.",
                            "Look once more.", "It is seven."])
    trace = Trace.from_parts(tokenizer, "What is 3 + 4?", thinking, "The answer is 7.", meta={"gold": "7"})
    config = ValidationConfig(conditions=["baseline"], max_key_steps=None, n_boot=200, resampling=2,
                              resampling_tokens=3, resampling_kind="integer")
    result = validate(tiny_bridge, [trace], tmp_path / "v", config=config, progress=False)
    record = result.records[0]
    found = record["resampling"]
    assert len(found["steps"]) == 5 and set(found) >= {"signal_saliency", "signal_receiver", "signal_knockout"}
    assert (tmp_path / "v" / "resampling" / "trace0000.jsonl").exists()
    for signal in ("saliency", "knockout"):
        x = np.array([np.nan if v is None else v for v in found[f"signal_{signal}"]])
        y = np.array([np.nan if v is None else v for v in found["importance_kl"]])
        known = np.isfinite(x) & np.isfinite(y)
        expected = spearman(x[known], y[known])
        got = record["rho"][f"{signal}|all|resampling_kl"]
        assert (got is None and not np.isfinite(expected)) or got == pytest.approx(expected)
    assert {"saliency", "receiver", "knockout"} <= set(result.agreement["map"])
    with pytest.raises(StepflowError, match="resampling must be 0"):
        ValidationConfig(resampling=1)
