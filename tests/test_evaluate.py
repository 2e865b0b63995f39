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
from stepflow_tl.study.results import ResultsFile, lock_path, read_results
from stepflow_tl.study.run import _runs, _saliency_path, evaluate, item_seed, load_study, safe_file_name

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


def _eos_after_multiples_of(monkeypatch, model, k):
    """Rows end at different lengths: EOS follows every sampled token whose id is a multiple
    of ``k`` (random weights never say EOS). The rule reads only the row's own token."""
    from stepflow_tl.tl.adapter import ModelAdapter

    decode, eos = ModelAdapter.decode, model.tokenizer.eos_token_id

    def ending(self, state, next_tokens):
        logits, state = decode(self, state, next_tokens)
        logits[next_tokens[:, 0] % k == 0, -1, eos] = 1e4
        return logits, state

    monkeypatch.setattr(ModelAdapter, "decode", ending)


def test_refilling_study_gives_every_item_the_same_result_in_any_batch(tiny_bridge, monkeypatch, tmp_path):
    """A condition's items run in one refilling batch: whatever the batch size, and when a
    resume leaves gaps (other items beside each one, in another order of finishing),
    every item's seed, tokens, grade and events are the same."""
    _eos_after_multiples_of(monkeypatch, tiny_bridge, 3)
    problems = [Problem(i, q, a, "integer") for i, q, a in QUESTIONS]
    kw = dict(conditions={"baseline": [], "oeb": [OddsEqualBridge(layers=[0])]}, samples=2, seed=5,
              max_new_tokens=8, do_sample=True, temperature=1.5, progress=False)
    reference = evaluate(tiny_bridge, problems, batch_size=1, **kw).items
    assert reference["n_tokens"].nunique() >= 3 and (reference["stop_reason"] == "eos").any()
    assert (reference[reference["condition"] == "oeb"]["n_events"] > 0).any()
    key = ["condition", "problem_id", "sample"]
    expected = reference[COMPARED].sort_values(key).reset_index(drop=True)
    for batch_size in (3, 24):
        got = evaluate(tiny_bridge, problems, batch_size=batch_size, **kw).items
        pd.testing.assert_frame_equal(got[COMPARED].sort_values(key).reset_index(drop=True), expected)
    path = tmp_path / "r.jsonl"
    evaluate(tiny_bridge, problems, batch_size=4, results_path=path, **kw)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + lines[1::3]))  # the header and a third of the items
    resumed = evaluate(tiny_bridge, problems, batch_size=5, results_path=path, **kw).items
    pd.testing.assert_frame_equal(resumed[COMPARED].sort_values(key).reset_index(drop=True), expected)


def test_the_model_is_resolved_once_per_entry_point_not_per_item(tiny_bridge, monkeypatch):
    """evaluate resolves the model's tokenizer once and passes the tokenizer down; each
    condition's `generate` call (an entry point of its own) resolves it once more; nothing
    is resolved per item (issue 21: an evaluate call used to enter tokenizer_of 11 times)."""
    import importlib

    real = importlib.import_module("stepflow_tl.tl.adapter").tokenizer_of
    from_model = []

    def counting(model_or_tok):
        if hasattr(model_or_tok, "cfg"):
            from_model.append(model_or_tok)
        return real(model_or_tok)

    for name, module in list(sys.modules.items()):
        if name.startswith("stepflow_tl") and getattr(module, "tokenizer_of", None) is real:
            monkeypatch.setattr(module, "tokenizer_of", counting)
    conditions = {"baseline": [], "oeb": [OddsEqualBridge(layers=[0])]}
    for n in (1, 3):
        from_model.clear()
        problems = [Problem(i, q, a, "integer") for i, q, a in QUESTIONS[:n]]
        evaluate(tiny_bridge, problems, conditions=conditions, samples=2, max_new_tokens=2, batch_size=1,
                 progress=False)
        assert len(from_model) == 1 + len(conditions), n


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
                n_events=0, mean_kl=None, saliency=None, prompt_ids=[1, 2], output_ids=[3, 4])
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
    with pytest.raises(StepflowError, match=r"different config \(differs in \['a'\]; a: 1 in the file, 2 now\)"):
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
    # items written before prompt_ids/output_ids existed still read
    old = tmp_path / "old.jsonl"
    with ResultsFile.open(old, {"a": 1}) as store:
        store.append({k: v for k, v in _item().items() if k not in ("prompt_ids", "output_ids")})
    assert len(read_results(old)[1]) == 1


def _store_with(path, items, config=None):
    with ResultsFile.open(path, config or {"a": 1}) as store:
        for it in items:
            store.append(it)


def test_a_second_writer_is_refused_naming_the_lock_and_the_owner(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile.open(path, {"a": 1}) as store:
        store.append(_item("p1"))
        assert lock_path(path).is_file()
        with pytest.raises(StepflowError, match=rf"being written by another study \(pid {os.getpid()} on .*lock "
                                                rf".*r\.jsonl\.lock\).*another --out"):
            ResultsFile.open(path, {"a": 1})
    assert not lock_path(path).exists()  # released and removed on close
    with ResultsFile.open(path, {"a": 1}) as store:  # and free again
        assert len(store.records) == 1


def test_another_process_is_refused_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "r.jsonl"
    code = ("import time; from stepflow_tl.study.results import ResultsFile\n"
            f"s = ResultsFile.open({str(path)!r}, {{'a': 1}}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StepflowError, match=f"pid {holder.pid}"):
            ResultsFile.open(path, {"a": 1})
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert lock_path(path).exists()  # the file stays, the kernel dropped the lock
    with ResultsFile.open(path, {"a": 1}) as store:
        assert store.records == []


def test_reading_refuses_duplicated_and_foreign_items_naming_them(tmp_path, tiny_bridge):
    dup = tmp_path / "dup.jsonl"
    _store_with(dup, [_item("p1"), _item("p2")])
    with open(dup, "a") as f:  # what two concurrent writers used to leave
        f.write(json.dumps({"type": "item", **_item("p1")}) + "\n")
    with pytest.raises(StepflowError, match=r"line 4: problem 'p1', condition 'baseline', sample 0 is already on "
                                            r"line 2.*count the item twice.*Delete the file"):
        read_results(dup)
    with pytest.raises(StepflowError, match="already on line 2"):
        ResultsFile.open(dup, {"a": 1})
    bad_type = tmp_path / "t.jsonl"
    _store_with(bad_type, [_item("p1")])
    with open(bad_type, "a") as f:
        f.write(json.dumps({"type": "item", **_item("p2", sample="0")}) + "\n")
    with pytest.raises(StepflowError, match=r"sample='0' have the wrong type"):
        read_results(bad_type)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(StepflowError, match="not a text file"):
        load_study(binary)

    # A resumed study refuses an item whose problem is not in the study (an edited
    # file) instead of counting it; this used to end in "low <= accuracy <= high".
    problems = [Problem(i, q, a, "integer", difficulty=1) for i, q, a in QUESTIONS[:2]]
    path = tmp_path / "r.jsonl"
    kw = dict(conditions=["baseline"], max_new_tokens=2, progress=False, results_path=path)
    evaluate(tiny_bridge, problems, **kw)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1].replace('"a2"', '"zz9"')]) + "\n")
    with pytest.raises(StepflowError, match=r"problem 'zz9', condition 'baseline', sample 0 is not one of this "
                                            r"study's 2 problems.*delete the file or use another --out"):
        evaluate(tiny_bridge, problems, **kw)
    header = json.loads(lines[0])["config"]
    path.write_text("\n".join(lines[:-1] + [lines[-1].replace('"baseline"', '"oeb"')]) + "\n")
    with pytest.raises(StepflowError, match=r"condition 'oeb', sample 0 names a condition the header does not "
                                            r"have \(\['baseline'\]\)"):
        load_study(path)
    assert header["dtype"] == "float32" and set(header["software"]) >= {"torch", "transformers", "transformer_lens"}


def test_a_resume_under_other_software_is_refused(tiny_bridge, tmp_path, monkeypatch):
    import stepflow_tl.study.run as ev

    problems = [Problem("a1", "What is 2 + 3?", "5", "integer")]
    kw = dict(conditions=["baseline"], max_new_tokens=2, progress=False, results_path=tmp_path / "r.jsonl")
    evaluate(tiny_bridge, problems, **kw)
    now = ev._software()
    monkeypatch.setattr(ev, "_software", lambda: {**now, "transformers": "9.9"})
    with pytest.raises(StepflowError, match=r"r\.jsonl was written by a study with a different config \(differs in "
                                            r"\['software'\].*delete the file to start over"):
        evaluate(tiny_bridge, problems, **kw)


def test_saliency_file_names_are_unique_per_item_after_sanitising(tiny_bridge, tokenizer, tmp_path, monkeypatch):
    import importlib
    from dataclasses import replace

    from stepflow_tl.traces.trace import Trace

    ids = ["p/1", "p_1", "P_1", "..", "../../etc/passwd", " a b ", "a b", "ünïcødé", "ünïcødë", "x" * 300,
           "x" * 299 + "y", ""]
    names = [safe_file_name(i) for i in ids]
    assert len(set(names)) == len(ids) and len({n.lower() for n in names}) == len(ids)
    results = tmp_path / "out" / "results.jsonl"
    for i in ids:
        target = _saliency_path(results, "my/cond", i, 0)
        assert target.parent.parent == tmp_path / "out" / "results.saliency"  # never outside, never deeper
        assert len(target.name) < 80 and target.name.isascii() and not target.name.startswith(".")

    # End to end: every item's map is its own file, and each row points at its map.
    two_steps = Trace.from_parts(tokenizer, question="What is 2 + 3?", thinking="First.\n\nThen five.",
                                 summary="5")
    run_module = importlib.import_module("stepflow_tl.study.run")  # the package exports a function named run
    real = run_module.generate
    monkeypatch.setattr(run_module, "generate", lambda *a, on_finish, **kw: real(
        *a, on_finish=lambda j, g: on_finish(j, replace(g, trace=two_steps)), **kw))
    problems = [Problem(i or "empty", "What is 2 + 3?", "5", "integer") for i in ids[:4] + ids[-3:-1]]
    result = evaluate(tiny_bridge, problems, conditions=["baseline"], max_new_tokens=2, progress=False,
                      saliency=True, results_path=results)
    files = sorted((tmp_path / "out" / "results.saliency").rglob("*.npz"))
    assert len(files) == len(problems)
    loaded = load_study(results)
    for p in problems:
        assert loaded.saliency[(p.id, "baseline", 0)].meta["problem_id"] == p.id
    assert set(result.items["saliency"]) == {str(f.relative_to(tmp_path / "out")) for f in files}


def test_study_maps_follow_auto_mode_and_are_tiled(tiny_bridge, tokenizer, monkeypatch):
    """evaluate's maps use mode="auto": tiled, equal to the dense map (auto's choice where
    tiled cannot run) to fp32 rounding."""
    import importlib
    from dataclasses import replace

    import stepflow_tl.saliency.compute as compute
    from stepflow_tl.traces.trace import Trace

    trace = Trace.from_parts(tokenizer, question="What is 2 + 3?", thinking="First.\n\nThen five.", summary="5")
    run_module = importlib.import_module("stepflow_tl.study.run")
    real = run_module.generate
    monkeypatch.setattr(run_module, "generate", lambda *a, on_finish, **kw: real(
        *a, on_finish=lambda j, g: on_finish(j, replace(g, trace=trace)), **kw))
    maps = {}
    for reason in (None, "a refusal"):
        monkeypatch.setattr(compute, "tiled_unsupported_reason", lambda model, r=reason: r)
        result = evaluate(tiny_bridge, [Problem("a1", "What is 2 + 3?", "5", "integer")], conditions=["baseline"],
                          max_new_tokens=2, progress=False, saliency=True)
        (saliency,) = result.saliency.values()
        assert saliency.meta["requested_mode"] == "auto"
        maps[saliency.meta["mode"]] = saliency.maps
    assert set(maps) == {"tiled", "dense"}
    assert float((maps["tiled"] - maps["dense"]).abs().max()) <= 1e-6 * float(maps["dense"].abs().max())


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


def test_a_level_with_no_correct_answer_still_renders(tmp_path):
    # 0/3 gave a Wilson low of 5.6e-17 > 0 and the report refused it with "every row
    # needs low <= accuracy <= high" (what issue 12 saw after resuming garbage rows).
    items = pd.DataFrame([_item(f"p{i}", correct=False, difficulty=1) for i in range(3)]
                         + [_item(f"q{i}", correct=True, difficulty=2) for i in range(3)])
    result = StudyResult(items=items, config={"model": "m"}, conditions=["baseline"])
    by = result.by_difficulty().set_index("difficulty")
    assert (by.loc[1, "low"], by.loc[1, "accuracy"], by.loc[2, "accuracy"], by.loc[2, "high"]) == (0.0, 0.0, 1.0, 1.0)
    assert "Accuracy by difficulty" in result.save_html(tmp_path / "r.html").read_text()


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


SUMMARY_NUMBERS = ["condition", "n", "n_correct", "accuracy", "acc_low", "acc_high", "n_paired", "n_changed", "diff",
                   "diff_low", "diff_high", "b01", "b10", "mcnemar_p", "p_holm", "mean_tokens", "events_per_item"]


def test_killed_run_resumes_to_the_same_results(problem_file, reference_run, tmp_path):
    kill_after = N_ITEMS // 2 + 2  # the first condition done, the second one started
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen(_study_cmd(problem_file, tmp_path), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    n_lines = 0
    while time.monotonic() < deadline and proc.poll() is None:
        n_lines = results.read_bytes().count(b"\n") if results.exists() else 0
        if n_lines >= 1 + kill_after:  # header and the items
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # midway through a condition (each has N_ITEMS // 2 items)
    proc.wait()
    _, partial = read_results(results)
    assert kill_after <= len(partial) < N_ITEMS
    with open(results, "ab") as f:
        f.write(b'{"type": "item", "problem_id": "a')  # as if the kill had cut a write
    rerun = subprocess.run(_study_cmd(problem_file, tmp_path), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = _items(results)
    assert not resumed.duplicated(["problem_id", "condition", "sample"]).any()
    assert len(resumed) == N_ITEMS
    pd.testing.assert_frame_equal(resumed, _items(reference_run[0] / "results.jsonl"))
    # and the numbers a user reads are those of the uninterrupted run
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv")[SUMMARY_NUMBERS],
                                  pd.read_csv(reference_run[0] / "summary.csv")[SUMMARY_NUMBERS])


def test_two_studies_started_at_once_on_one_file_never_double_count(problem_file, reference_run, tmp_path):
    limit = 3  # of the 6 problems: still longer than the gap between the two starts
    procs = [subprocess.Popen(_study_cmd(problem_file, tmp_path) + ["--limit", str(limit)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    # Whoever takes the lock runs the study; the other is refused with a message naming
    # the owner, or, if it gets there after the first finished, resumes with nothing to do.
    assert codes in ([0, 0], [0, 2]), outs
    for proc, (stdout, stderr), other in zip(procs, outs, reversed(procs)):
        if proc.returncode == 2:
            assert f"being written by another study (pid {other.pid} on " in stderr
            assert stderr.count("\n") == 1 and "Traceback" not in stderr
    items = _items(tmp_path / "results.jsonl")
    assert len(items) == 2 * limit and not items.duplicated(["problem_id", "condition", "sample"]).any()
    reference = _items(reference_run[0] / "results.jsonl")
    reference = reference[reference["problem_id"].isin([q[0] for q in QUESTIONS[:limit]])].reset_index(drop=True)
    pd.testing.assert_frame_equal(items, reference)
    assert load_study(tmp_path / "results.jsonl").summary()["n"].tolist() == [limit, limit]


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
    with pytest.raises(StepflowError, match=r"different config \(differs in \['seed'\];"):
        evaluate(tiny_bridge, problems, seed=1, **kw)
    with pytest.raises(StepflowError, match=r"differs in \['conditions'\];"):
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


@pytest.mark.parametrize("kw, message", [
    (dict(samples=1.5), r"samples must be an integer, got 1.5"),
    (dict(batch_size=0), r"batch_size must be an integer >= 1"),
    (dict(max_new_tokens=float("nan")), r"max_new_tokens must be an integer"),
    (dict(seed=0.5), r"seed must be an integer"),
    (dict(do_sample=1), r"do_sample must be True or False"),
    (dict(temperature=float("nan")), r"temperature must be a finite number in \(0.0, inf\)"),
    (dict(top_p=0), r"top_p must be a finite number in \(0.0, 1.0\]"),
    (dict(saliency=-2), r"saliency .* must be an integer >= 0"),
    (dict(saliency=1.5), r"saliency .* must be an integer"),
    (dict(saliency_loss="answers"), r"saliency_loss must be one of"),
])
def test_study_settings_are_checked_before_anything_runs(tiny_bridge, tmp_path, kw, message):
    problems = [Problem("a1", "What is 2 + 3?", "5", "integer")]
    with pytest.raises(StepflowError, match=message):
        evaluate(tiny_bridge, problems, progress=False, results_path=tmp_path / "r.jsonl", **kw)
    assert not (tmp_path / "r.jsonl").exists()


def test_demo_and_suite_configs_are_checked():
    from stepflow_tl.study.demo import DemoConfig
    from stepflow_tl.study.problems import SuiteConfig, builtin_suite

    with pytest.raises(StepflowError, match=r"DemoConfig.max_new_tokens must be an integer >= 1"):
        DemoConfig(max_new_tokens=0)
    with pytest.raises(StepflowError, match=r"DemoConfig.conditions: unknown \['stepflw'\]"):
        DemoConfig(conditions=("baseline", "stepflw"))
    with pytest.raises(StepflowError, match=r"SuiteConfig.start_range\[0\] must be an integer, got 2.5"):
        SuiteConfig(start_range=(2.5, 9))
    with pytest.raises(StepflowError, match=r"n_per_level must be an integer"):
        builtin_suite(n_per_level=1.5)
