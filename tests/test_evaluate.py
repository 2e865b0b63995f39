"""Paired studies: seeds, the resumable JSONL store, the CLI end to end, a killed run
resumed, and a two-process accelerate run equal to a single-process one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stepflow_tl.errors import StepflowError
from stepflow_tl.interventions.bridge import OddsEqualBridge, RandomBridge
from stepflow_tl.interventions.generate import row_seed
from stepflow_tl.interventions.generate import seed_for_rows as _call_seed
from stepflow_tl.saliency.maps import StepSaliency
from stepflow_tl.study.conditions import ABLATION, CONDITIONS, resolve_conditions
from stepflow_tl.study.problems import Problem
from stepflow_tl.study.result import StudyResult
from stepflow_tl.study.results import ITEM_COLUMNS as ITEM_KEYS
from stepflow_tl.study.results import ResultsFile, read_results
from stepflow_tl.study.run import _runs, evaluate, item_seed, load_study

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = Path(PY).with_name("accelerate")
QUESTIONS = [("a1", "What is 2 + 3?", "5"), ("a2", "What is 7 - 4?", "3"), ("a3", "What is 3 * 3?", "9"),
             ("a4", "What is 8 + 1?", "9"), ("a5", "What is 6 - 6?", "0"), ("a6", "What is 1 + 1?", "2")]
STUDY_ARGS = ["--model", "tiny", "--conditions", "baseline,random_stepflow", "--max-new-tokens", "6",
              "--batch-size", "1", "--no-progress"]
N_ITEMS = len(QUESTIONS) * 2
COMPARED = ["problem_id", "condition", "sample", "seed", "correct", "extracted", "output", "n_tokens",
            "stop_reason", "events", "n_events"]


def _env():
    # One thread per process: the single- and two-process runs then do the same float
    # arithmetic, so greedy outputs can be compared exactly.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "six.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    return path


def _study_cmd(problem_file, out):
    return [PY, "-m", "stepflow_tl", "eval", str(problem_file), "--out", str(out), *STUDY_ARGS]


@pytest.fixture(scope="module")
def reference_run(problem_file, tmp_path_factory):
    """An uninterrupted single-process CLI run; its directory."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(_study_cmd(problem_file, out), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _items(path) -> pd.DataFrame:
    _, records = read_results(path)
    df = pd.DataFrame(records)
    df["events"] = df["events"].map(lambda e: json.dumps(e, sort_keys=True))
    return df[COMPARED].sort_values(["condition", "problem_id", "sample"]).reset_index(drop=True)


# --------------------------------------------------------------------------- seeds
def test_call_seed_gives_every_item_its_own_seed_in_any_batch():
    for seed in (0, 7, 2**40 + 3):
        for first in (0, 1, 5, 1000):
            base = _call_seed(seed, first)
            assert [row_seed(base, j) for j in range(4)] == [item_seed(seed, first + j) for j in range(4)]


def test_runs_break_batches_at_gaps_and_size():
    assert _runs([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert _runs([0, 1, 3, 4, 5, 9], 8) == [[0, 1], [3, 4, 5], [9]]


def test_same_seeds_in_every_condition_and_batch_size(tiny_bridge):
    problems = [Problem(i, q, a, "integer") for i, q, a in QUESTIONS[:2]]
    conditions = {"baseline": [], "mine": [OddsEqualBridge(layers=[0])], "rb": [RandomBridge(layers=[0])]}
    kw = dict(conditions=conditions, samples=2, seed=3, max_new_tokens=3, do_sample=True, progress=False)
    one = evaluate(tiny_bridge, problems, batch_size=1, **kw).items
    many = evaluate(tiny_bridge, problems, batch_size=4, **kw).items
    assert len(one) == len(many) == 2 * 2 * 3
    for frame in (one, many):
        seeds = frame.pivot_table(index=["problem_id", "sample"], columns="condition", values="seed")
        assert (seeds.nunique(axis=1) == 1).all()  # paired: one seed per (problem, sample)
        assert seeds["baseline"].nunique() == 4  # and a different one for every item
    key = ["condition", "problem_id", "sample"]
    assert one.sort_values(key)["seed"].tolist() == many.sort_values(key)["seed"].tolist()
    assert (one[one["condition"] != "baseline"]["n_events"] > 0).any()


def test_conditions_registry_and_errors():
    assert set(ABLATION) >= {"baseline", "stepflow", "oeb", "smi", "random_bridge", "matched_noise",
                             "random_momentum", "oeb_top", "smi_bottom"}
    built = resolve_conditions(["baseline", "oeb_top"])
    assert built["baseline"] == [] and built["oeb_top"][0].layers == "top_quarter"
    custom = resolve_conditions({"x": lambda: [OddsEqualBridge()], "y": []})
    assert list(custom) == ["x", "y"]
    assert resolve_conditions("baseline, smi_bottom")["smi_bottom"][0].layers == "bottom_quarter"
    with pytest.raises(StepflowError, match="unknown condition"):
        resolve_conditions(["baseline", "nope"])
    assert CONDITIONS["baseline"]() == []


# --------------------------------------------------------------------------- store
def _item(pid="p", cond="baseline", sample=0, **kw):
    base = dict(problem_id=pid, condition=cond, sample=sample, seed=1, correct=True, extracted="5", gold="5",
                output="5", n_tokens=2, stop_reason="eos", wall_time_s=0.1, difficulty=None, events={},
                n_events=0, mean_kl=None, saliency=None)
    return {**base, **kw}


def test_results_file_truncates_partial_line_and_refuses_other_config(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, {"a": 1}) as store:
        store.append(_item("p1"))
        store.append(_item("p2"))
    with open(path, "ab") as f:
        f.write(b'{"type": "item", "problem_id": "p3", "cond')  # a write cut by a kill
    with ResultsFile.open(path, {"a": 1}) as store:
        assert [r["problem_id"] for r in store.records] == ["p1", "p2"]
        store.append(_item("p3"))
    assert path.read_bytes().endswith(b"\n")
    header, records = read_results(path)
    assert header == {"a": 1} and [r["problem_id"] for r in records] == ["p1", "p2", "p3"]
    with pytest.raises(StepflowError, match=r"different config \(differs in \['a'\]\)"):
        ResultsFile.open(path, {"a": 2})
    with pytest.raises(StepflowError, match="lacks keys"):
        with ResultsFile.open(path, {"a": 1}) as store:
            store.append({"problem_id": "x"})


def test_results_file_rejects_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "f.jsonl"
    foreign.write_text('{"hello": 1}\n')
    with pytest.raises(StepflowError, match="not a stepflow_tl results header"):
        ResultsFile.open(foreign, {"a": 1})
    corrupt = tmp_path / "c.jsonl"
    with ResultsFile.open(corrupt, {"a": 1}) as store:
        store.append(_item())
    with open(corrupt, "a") as f:
        f.write("not json\n")
    with pytest.raises(StepflowError, match="line 3: not valid JSON"):
        read_results(corrupt)
    assert set(ITEM_KEYS) <= set(_item())


# --------------------------------------------------------------------------- statistics and report
def _fake_saliency(rng, pid, correct, n_steps=4):
    maps = torch.from_numpy(np.tril(rng.random((4, n_steps, n_steps))))
    kinds = ["question"] + ["thinking"] * (n_steps - 1)
    return StepSaliency(maps=maps, layers=[0, 1, 2, 3], n_model_layers=4, step_kinds=kinds,
                        step_labels=[f"S{i}" for i in range(n_steps)],
                        meta={"problem_id": pid, "sample": 0, "correct": correct})


def test_study_result_statistics_report_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    base = [1, 0, 1, 0, 1, 0, 0, 1, 1, 0]
    cond = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    rows = []
    for name, outcome in (("baseline", base), ("stepflow", cond)):
        for i, c in enumerate(outcome):
            rows.append(_item(f"p{i}", name, correct=bool(c), difficulty=1 + i % 2, wall_time_s=1.0 if name ==
                              "baseline" else 1.5, events={"oeb": 3} if name == "stepflow" else {},
                              n_events=3 if name == "stepflow" else 0, saliency="x"))
    items = pd.DataFrame(rows)
    maps = {(r["problem_id"], r["condition"], 0): _fake_saliency(rng, r["problem_id"], r["correct"]) for r in rows}
    result = StudyResult(items=items, config={"model": "m", "n_problems": 10}, conditions=["baseline", "stepflow"],
                         saliency=maps)
    s = result.summary(n_boot=2000).set_index("condition")
    assert s.loc["baseline", "accuracy"] == 0.5 and s.loc["stepflow", "accuracy"] == 0.8
    assert s.loc["stepflow", "diff"] == pytest.approx(0.3)
    assert s.loc["stepflow", "diff_low"] <= 0.3 <= s.loc["stepflow", "diff_high"]
    assert (s.loc["stepflow", "b01"], s.loc["stepflow", "b10"]) == (3, 0)
    assert s.loc["stepflow", "mcnemar_p"] == pytest.approx(0.25)  # 3 discordant, all one way: 2 * 0.5**3
    assert s.loc["stepflow", "time_ratio"] == pytest.approx(1.5)
    assert s.loc["stepflow", "n_changed"] == 0  # every output is "5"
    assert s.loc["stepflow", "acc_low"] < 0.8 < s.loc["stepflow", "acc_high"]
    by = result.by_difficulty()
    assert set(by["difficulty"]) == {1, 2} and by["n"].sum() == 20
    comparison = result.compare_saliency()
    assert set(comparison["condition"]) == {"baseline", "stepflow"}
    paths = result.to_csv(tmp_path)
    assert set(paths) == {"items", "summary", "by_difficulty", "saliency_compare"}
    assert json.loads(pd.read_csv(paths["items"])["events"].iloc[-1]) == {"oeb": 3}
    html = result.save_html(tmp_path / "r.html").read_text()
    assert "Accuracy by difficulty" in html and "data:image/png;base64" in html
    assert "stepflow: p" in html and "(incorrect)" in html and "CircuitsVis.render" in html


# --------------------------------------------------------------------------- CLI, kill, accelerate
def test_cli_end_to_end_writes_report_and_csv(reference_run):
    out, stdout = reference_run
    assert f"report: {out / 'report.html'}" in stdout
    summary = pd.read_csv(out / "summary.csv")
    assert summary["condition"].tolist() == ["baseline", "random_stepflow"]
    assert summary["n"].tolist() == [6, 6] and summary["n_paired"].tolist() == [6, 6]
    assert {"accuracy", "acc_low", "acc_high", "diff", "diff_low", "diff_high", "mcnemar_p", "mean_tokens",
            "time_ratio"} <= set(summary.columns)
    items = pd.read_csv(out / "items.csv")
    assert len(items) == N_ITEMS and set(items["problem_id"]) == {q[0] for q in QUESTIONS}
    html = (out / "report.html").read_text()
    assert "<table" in html and "random_stepflow" in html and "Results per condition" in html
    header, records = read_results(out / "results.jsonl")
    assert header["conditions"]["random_stepflow"][0].startswith("RandomBridge(")
    assert len(records) == N_ITEMS
    assert load_study(out / "results.jsonl").summary()["n"].tolist() == [6, 6]


def test_killed_run_resumes_to_the_same_results(problem_file, reference_run, tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen(_study_cmd(problem_file, tmp_path), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    n_lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        n_lines = results.read_bytes().count(b"\n") if results.exists() else 0
        if n_lines >= 1 + 2:  # header and two items
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, partial = read_results(results)
    assert 2 <= len(partial) < N_ITEMS
    with open(results, "ab") as f:
        f.write(b'{"type": "item", "problem_id": "a')  # as if the kill had cut a write
    rerun = subprocess.run(_study_cmd(problem_file, tmp_path), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = _items(results)
    assert not resumed.duplicated(["problem_id", "condition", "sample"]).any()
    assert len(resumed) == N_ITEMS
    pd.testing.assert_frame_equal(resumed, _items(reference_run[0] / "results.jsonl"))


def test_resume_skips_done_items_and_refuses_another_config(tiny_bridge, tmp_path):
    problems = [Problem(i, q, a, "integer", difficulty=1) for i, q, a in QUESTIONS[:2]]
    path = tmp_path / "r.jsonl"
    kw = dict(conditions=["baseline", "oeb"], max_new_tokens=2, progress=False, results_path=path)
    first = evaluate(tiny_bridge, problems[:1] + problems[1:], **kw)
    mtime = path.stat().st_mtime_ns
    again = evaluate(tiny_bridge, problems, batch_size=5, **kw)  # nothing left to run
    assert path.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again.items, first.items)
    reordered = evaluate(tiny_bridge, problems, **{**kw, "conditions": ["oeb", "baseline"]})
    assert len(reordered.items) == 4
    with pytest.raises(StepflowError, match=r"different config \(differs in \['seed'\]\)"):
        evaluate(tiny_bridge, problems, seed=1, **kw)
    with pytest.raises(StepflowError, match=r"differs in \['conditions'\]"):
        evaluate(tiny_bridge, problems, **{**kw, "conditions": ["baseline"]})


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate is not installed in this environment")
def test_two_accelerate_processes_match_one(problem_file, reference_run, tmp_path):
    cmd = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "-m", "stepflow_tl", "eval", str(problem_file), "--out", str(tmp_path), *STUDY_ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("results.rank*")), "shards are merged and removed"
    assert proc.stdout.count("report: ") == 1  # only the main process writes the report
    pd.testing.assert_frame_equal(_items(tmp_path / "results.jsonl"), _items(reference_run[0] / "results.jsonl"))
