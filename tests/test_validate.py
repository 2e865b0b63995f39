"""Validation study: the knockout matrix against a hand-written knockout, the statistics
against scipy, the tables, the command end to end with resume, and two accelerate
processes equal to one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import sum_trace
from scipy import stats as sps

from stepflow_tl.errors import StepflowError
from stepflow_tl.stats import bootstrap_mean_ci, paired_bootstrap_ci, spearman, wilcoxon_signed_rank
from stepflow_tl.study.validate import (
    ValidationConfig,
    agreement,
    distance_map,
    knockout_matrix,
    load_validation,
    repair_table,
    sample_key_steps,
    specificity_table,
)
from stepflow_tl.tl.adapter import attn_hook

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable  # its sibling `accelerate` launches the two-process runs
ACCELERATE = Path(PY).with_name("accelerate")


@pytest.fixture(scope="module")
def trace(tokenizer):
    return sum_trace(tokenizer)


def hand_knockout(model, trace, j, layers):
    """E[:, j] by hand: -inf on the scores from tokens of later steps to step j's tokens."""
    steps = trace.token_steps
    blocked = (steps[:, None] > j) & (steps[None, :] == j)  # [q, k]

    def hook(scores, hook):
        return scores.masked_fill(blocked, float("-inf"))

    def step_loss(logits):
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        ce = -logp.gather(-1, trace.token_ids[1:, None])[:, 0]
        return torch.stack([ce[steps[1:] == i].mean() if (steps[1:] == i).any() else torch.tensor(math.nan)
                            for i in range(trace.n_steps)])

    tokens = trace.token_ids[None]
    with torch.no_grad():
        clean = step_loss(model(tokens))
        knocked = step_loss(model.run_with_hooks(tokens, fwd_hooks=[(attn_hook(l, "attn_scores"), hook)
                                                                     for l in layers]))
    return knocked - clean


@pytest.mark.parametrize("layers", [None, [1]])
def test_knockout_matrix_equals_a_hand_written_attn_scores_knockout(tiny_model, trace, layers):
    ko = knockout_matrix(tiny_model, trace, key_steps=[0, 2, 3], layers=layers)
    n = trace.n_steps
    assert ko.effects.shape == (n, n) and ko.key_steps == [0, 2, 3]
    for j in range(n):
        col = ko.effects[:, j]
        if j not in ko.key_steps:
            assert torch.isnan(col).all()
            continue
        assert torch.isnan(col[: j + 1]).all()
        expected = hand_knockout(tiny_model, trace, j, layers or range(tiny_model.cfg.n_layers))[j + 1:]
        torch.testing.assert_close(col[j + 1:], expected, rtol=1e-6, atol=1e-9)
        assert col[j + 1:].abs().max() > 0
    with pytest.raises(StepflowError, match="no later step"):
        knockout_matrix(tiny_model, trace, key_steps=[n - 1])


def test_key_step_sampling_is_seeded():
    assert sample_key_steps(5, 8, 0, 0) == [0, 1, 2, 3]
    a = sample_key_steps(40, 8, 3, 7)
    assert a == sample_key_steps(40, 8, 3, 7) and len(a) == 8 and a == sorted(set(a))
    assert a != sample_key_steps(40, 8, 3, 8)


def test_spearman_wilcoxon_and_bootstrap_against_scipy():
    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        x, y = rng.normal(size=n), rng.normal(size=n)
        y[: n // 2] = x[: n // 2]  # some agreement
        x[0] = x[1]  # a tie
        assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
        assert wilcoxon_signed_rank(x, y) == pytest.approx(sps.wilcoxon(y - x).pvalue, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [2, 1]))
    assert math.isnan(wilcoxon_signed_rank([1, 2], [1, 2]))
    x = rng.normal(size=30)
    ours = bootstrap_mean_ci(x, n_boot=4000, seed=5)
    theirs = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                           random_state=np.random.default_rng(5), vectorized=True)
    se = x.std(ddof=1) / math.sqrt(x.size)  # Monte-Carlo agreement: well inside a tenth of a standard error
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.1 * se)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.1 * se)
    assert ours.diff == pytest.approx(x.mean())
    # the paired interval is the one-sample interval of the differences, draw for draw
    a = rng.normal(size=30)
    b = a + x
    assert paired_bootstrap_ci(a, b, seed=2).to_dict() == bootstrap_mean_ci(b - a, seed=2).to_dict()


def test_agreement_over_pairs_below_the_diagonal():
    effects = torch.full((4, 4), math.nan, dtype=torch.float64)
    effects[1:, 0] = torch.tensor([3.0, 2.0, 1.0])
    effects[2:, 1] = torch.tensor([0.5, 0.2])
    m = distance_map(4)
    pairs = [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1)]
    expected = sps.spearmanr([m[i, j] for i, j in pairs], [effects[i, j] for i, j in pairs]).statistic
    assert agreement(m, effects) == pytest.approx(expected)
    assert math.isnan(agreement(m, torch.full((4, 4), math.nan)))


def _record(index, base, treat, ctrl):
    def metrics(v):
        bands = {b: {m: None for m in ("lock_in", "question_share", "summary_thinking_share", "summary_self",
                                       "thinking_self", "anomaly_ratio")} for b in ("shallow", "middle", "deep")}
        bands["shallow"]["lock_in"] = v
        return {"bands": bands, "ds_slope": None}

    return {"index": index, "rho": {}, "metrics": {"baseline": metrics(base), "oeb": metrics(treat),
                                                   "random_bridge": metrics(ctrl)}}


def test_repair_and_specificity_tables_by_hand():
    base = np.array([0.5, 0.6, 0.7, 0.4, 0.55])
    treat = base - np.array([0.1, 0.05, 0.2, 0.1, 0.0])
    ctrl = base - 0.01
    records = [_record(i, *v) for i, v in enumerate(zip(base, treat, ctrl))]
    conds = ["baseline", "oeb", "random_bridge"]
    rep = repair_table(records, conds, n_boot=1000)
    row = rep[(rep.condition == "oeb") & (rep.metric == "lock_in") & (rep.band == "shallow")].iloc[0]
    assert row.n == 5 and row["diff"] == pytest.approx((treat - base).mean())
    assert row.p == pytest.approx(sps.wilcoxon(treat - base).pvalue)
    ci = bootstrap_mean_ci(treat - base, n_boot=1000)
    assert (row.ci_low, row.ci_high) == (ci.low, ci.high)
    assert rep[rep.metric == "question_share"]["n"].eq(0).all()  # undefined metrics count no traces
    assert {"condition", "metric", "band", "n", "diff", "ci_low", "ci_high", "p", "p_holm"} <= set(rep.columns)
    spec = specificity_table(records, conds, n_boot=1000)
    row = spec[spec.metric == "lock_in"].iloc[0]
    assert (row.treatment, row.control, row.repair_direction) == ("oeb", "random_bridge", "-")
    assert row.advantage == pytest.approx((ctrl - treat).mean())  # lower lock-in is repair
    assert row.treatment_diff == pytest.approx((treat - base).mean())


def test_config_needs_a_baseline():
    with pytest.raises(StepflowError, match="baseline"):
        ValidationConfig(conditions=["stepflow"])
    with pytest.raises(StepflowError, match="unknown condition"):
        ValidationConfig(conditions=["baseline", "nope"])


# --------------------------------------------------------------------------- end to end
QUESTIONS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 3 * 3?", "9"), ("What is 8 + 1?", "9")]
VALIDATE_ARGS = ["--model", "tiny", "--conditions", "baseline,stepflow,random_stepflow", "--max-key-steps", "2",
                 "--n-boot", "200", "--no-progress", "--mode", "dense"]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    lines = []
    for k, (q, a) in enumerate(QUESTIONS):
        thinking = "\n\n".join(["Let me look at the numbers.", "Then I compute it.", f"So it is {a}."][: 2 + k % 2])
        lines.append(json.dumps({"question": q, "output": f"<think>\n{thinking}\n</think>\n\nThe answer is {a}.",
                                 "correct": k % 2 == 0}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _env():
    # One thread per process, here and in the in-process reference runs: the same float
    # arithmetic, so the one- and two-process results can be compared exactly.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(args) -> str:
    """``stepflow-tl ARGS`` in this process on one thread; its stdout."""
    import contextlib
    import io
    import warnings

    from stepflow_tl.cli import main

    threads = torch.get_num_threads()
    out = io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


@pytest.fixture(scope="module")
def reference_run(trace_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    stdout = _run(["validate", str(trace_file), "--out", str(out), *VALIDATE_ARGS])
    return out, stdout


def test_validate_command_writes_tables_and_report(reference_run):
    out, stdout = reference_run
    assert f"report: {out / 'report.html'}" in stdout
    repair = pd.read_csv(out / "repair.csv")
    assert {"condition", "metric", "band", "n", "diff", "ci_low", "ci_high", "p"} <= set(repair.columns)
    assert set(repair.condition) == {"stepflow", "random_stepflow"}
    agree = pd.read_csv(out / "agreement.csv")
    assert {"map", "band", "n_traces", "rho_mean", "ci_low", "ci_high"} <= set(agree.columns)
    assert set(agree["map"]) == {"saliency", "attention", "distance"}
    assert (agree.n_traces == 4).all()
    groups = pd.read_csv(out / "groups.csv")
    assert {"metric", "band", "effect", "p"} <= set(groups.columns)
    spec = pd.read_csv(out / "specificity.csv")
    assert set(spec.treatment) == {"stepflow"}
    html = (out / "report.html").read_text()
    assert html.count('class="cv-view"') >= 2 and "display:flex" in html and "Specificity" in html
    assert "http://" not in html.split("<script>")[0] and "src=\"http" not in html
    result = load_validation(out, n_boot=200)
    assert len(result.records) == 4


def test_validate_resumes_and_refuses_another_config(trace_file, reference_run, tmp_path, capsys):
    from stepflow_tl.cli import main

    # a killed run: the file holds two of four traces and a cut line; the rerun finishes it
    ref = (reference_run[0] / "results.jsonl").read_text().splitlines()
    out = tmp_path / "v"
    (out / "maps").mkdir(parents=True)
    (out / "results.jsonl").write_text("\n".join(ref[:3]) + "\n" + ref[3][:40])
    for f in (reference_run[0] / "maps").glob("trace000[01].*"):
        (out / "maps" / f.name).write_bytes(f.read_bytes())
    _run(["validate", str(trace_file), "--out", str(out), *VALIDATE_ARGS])
    assert _comparable(out) == _comparable(reference_run[0])
    assert main(["validate", str(trace_file), "--out", str(out), *VALIDATE_ARGS, "--seed", "1"]) == 2
    assert "differs in ['seed']; seed: 0 in the file, 1 now" in capsys.readouterr().err


def _comparable(out: Path):
    """The trace records without timings, in index order."""
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = sorted((json.loads(line) for line in lines[1:]), key=lambda r: r["index"])
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate is not installed in this environment")
def test_two_accelerate_processes_match_one(trace_file, reference_run, tmp_path):
    launch = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "-m", "stepflow_tl"]
    out = tmp_path / "v"
    proc = subprocess.run([*launch, "validate", str(trace_file), "--out", str(out), *VALIDATE_ARGS], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("results.rank*")), "shards are merged and removed"
    assert proc.stdout.count("report: ") == 1
    assert _comparable(out) == _comparable(reference_run[0])
    for name in ("repair", "agreement", "groups", "specificity"):
        pd.testing.assert_frame_equal(pd.read_csv(out / f"{name}.csv"), pd.read_csv(reference_run[0] / f"{name}.csv"))
    # stepflow-tl saliency shards the same way
    sal_args = ["saliency", str(trace_file), "--model", "tiny", "--mode", "dense"]
    one, two = tmp_path / "s1", tmp_path / "s2"
    _run([*sal_args, "--out", str(one)])
    proc = subprocess.run([*launch, *sal_args, "--out", str(two)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(two / "metrics.csv"), pd.read_csv(one / "metrics.csv"))
    for f in sorted(one.glob("trace*.npz")):
        assert np.array_equal(np.load(f)["maps"], np.load(two / f.name)["maps"])


def test_band_knockouts_are_compared_band_by_band(tiny_bridge, trace):
    from stepflow_tl.study.validate import validate_trace

    config = ValidationConfig(conditions=["baseline"], max_key_steps=2, knockout_bands=True, mode="dense")
    record = validate_trace(tiny_bridge, trace, 0, config)
    assert set(record["effects"]) == {"all", "shallow", "middle", "deep"}
    assert record["key_steps"] == sample_key_steps(trace.n_steps, 2, 0, 0)
    for band in ("shallow", "middle", "deep"):
        assert f"saliency|{band}|{band}" in record["rho"] and f"attention|{band}|all" in record["rho"]
    ko = knockout_matrix(tiny_bridge, trace, key_steps=record["key_steps"], layers=[0])
    assert np.allclose(np.array(record["effects"]["shallow"], dtype=float), ko.effects.numpy(), equal_nan=True)
    assert set(record["metrics"]) == {"baseline"} and record["rho"]["distance|all|all"] is not None
