"""The job runner every result-writing command uses: resume, refusal of another
config, of duplicated and foreign items, of a second writer, and of an output
directory holding another run's files; concurrent `validate` and `saliency` runs on
one --out, as tests/test_evaluate.py does for `eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stepflow_tl.errors import StepflowError
from stepflow_tl.study.jobs import JobFile, JobSchema, lock_path, read_jobs, run_jobs
from stepflow_tl.study.saliency_maps import load_saliency_maps, saliency_maps

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCHEMA = JobSchema(line_type="thing", version=1, what="test run", key=lambda r: r["i"], name=lambda r: f"thing {r['i']}")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _records(n):
    for i in range(n):
        yield {"question": f"Sam has {i + 2} pens and buys 3 more. How many pens does he have?",
               "output": f"Sam starts with {i + 2} pens.\n\nHe buys 3, so {i + 2} + 3 = {i + 5}.\n\n"
                         f"Check: {i + 5} - 3 = {i + 2}.\n</think>\n\nAnswer: \\boxed{{{i + 5}}}",
               "correct": i % 2 == 0}


def _trace_file(path, n):
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(n)))
    return path


# --------------------------------------------------------------------------- the runner
def test_run_jobs_resumes_and_refuses_damaged_files_and_other_configs(tmp_path):
    path = tmp_path / "r.jsonl"
    calls, stop_at = [], {3}

    class Stopped(Exception):
        pass

    def work(i, bar):
        if i in stop_at:
            stop_at.clear()
            raise Stopped  # a run stopped midway
        calls.append(i)
        return {"i": i, "value": i * i}

    with pytest.raises(Stopped):
        run_jobs(path, {"a": 1}, SCHEMA, list(range(5)), work, progress=False)
    assert [r["i"] for r in read_jobs(path, SCHEMA)[1]] == [0, 1, 2]
    assert not lock_path(path).exists()  # released on the way out
    with open(path, "ab") as f:
        f.write(b'{"type": "thing", "i": 3, "val')  # a write killed halfway
    calls.clear()
    records = run_jobs(path, {"a": 1}, SCHEMA, list(range(5)), work, progress=False)
    assert calls == [3, 4] and [r["value"] for r in records] == [0, 1, 4, 9, 16]
    assert run_jobs(path, {"a": 1}, SCHEMA, list(range(5)), work, progress=False) == records  # nothing to do
    with pytest.raises(StepflowError, match=r"r\.jsonl was written by a test run with a different config \(differs "
                                            r"in \['a'\]"):
        run_jobs(path, {"a": 2}, SCHEMA, list(range(5)), work, progress=False)
    with pytest.raises(StepflowError, match=r"holds items that are not part of this run \(e\.g\. 4\)"):
        run_jobs(path, {"a": 1}, SCHEMA, list(range(4)), work, progress=False)
    with open(path, "a") as f:
        f.write(json.dumps({"type": "thing", "i": 1, "value": 1}) + "\n")
    with pytest.raises(StepflowError, match=r"line 7: thing 1 is already on line 3.*count the item twice"):
        run_jobs(path, {"a": 1}, SCHEMA, list(range(5)), work, progress=False)


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    path = tmp_path / "r.jsonl"
    code = ("import time; from stepflow_tl.study.validate import VALIDATION_SCHEMA as S; "
            "from stepflow_tl.study.jobs import JobFile\n"
            f"s = JobFile.open({str(path)!r}, {{'a': 1}}, S); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from stepflow_tl.study.validate import VALIDATION_SCHEMA

        with pytest.raises(StepflowError, match=rf"being written by another validation run \(pid {holder.pid}"):
            JobFile.open(path, {"a": 1}, VALIDATION_SCHEMA)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- saliency
def test_saliency_runs_resume_and_a_reused_out_never_mixes_runs(tiny_bridge, tmp_path, capsys):
    from stepflow_tl.cli.main import main

    four, two = _trace_file(tmp_path / "four.jsonl", 4), _trace_file(tmp_path / "two.jsonl", 2)
    out = tmp_path / "out"
    run = saliency_maps(tiny_bridge, four, out, progress=False)
    assert [r["index"] for r in run.measured] == [0, 1, 2, 3] and (out / "trace0003.npz").exists()
    meta = run.load(0).meta
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["mode"] == "tiled"  # auto
    assert "torch=" in meta["software"]
    mtime = (out / "results.jsonl").stat().st_mtime_ns
    again = saliency_maps(tiny_bridge, four, out, progress=False)  # the same config resumes: nothing to do
    assert (out / "results.jsonl").stat().st_mtime_ns == mtime and again.records == run.records
    assert load_saliency_maps(out).records == run.records
    # another input into the same --out: refused, so trace0003.npz never sits beside two traces' metrics
    with pytest.raises(StepflowError, match=r"written by a saliency run with a different config \(differs in "
                                            r"\['n_traces', 'traces_sha'\]"):
        saliency_maps(tiny_bridge, two, out, progress=False)
    assert main(["saliency", str(two), "--model", "tiny", "--out", str(out)]) == 2
    assert "different config" in capsys.readouterr().err
    # maps without their results file (an older run's): refused too
    (out / "results.jsonl").unlink()
    assert main(["saliency", str(two), "--model", "tiny", "--out", str(out)]) == 2
    assert ("holds files of an earlier saliency run (trace0000.json, trace0000.npz, trace0001.json, ...) but no "
            "results.jsonl") in capsys.readouterr().err
    # the CLI writes what the library computed
    fresh = tmp_path / "fresh"
    assert main(["saliency", str(four), "--model", "tiny", "--out", str(fresh)]) == 0
    metrics = pd.read_csv(fresh / "metrics.csv")
    assert metrics["trace"].tolist() == [0, 1, 2, 3]
    assert {"dtype", "device", "mode", "software"} <= set(metrics.columns)
    assert (metrics["dtype"] == "float32").all()


def test_validate_refuses_an_out_with_maps_of_an_earlier_run(tmp_path, capsys):
    from stepflow_tl.cli.main import main

    traces = _trace_file(tmp_path / "t.jsonl", 2)
    (tmp_path / "o" / "maps").mkdir(parents=True)
    (tmp_path / "o" / "maps" / "trace0000.baseline.npz").write_bytes(b"")
    assert main(["validate", str(traces), "--model", "tiny", "--out", str(tmp_path / "o"), "--conditions",
                 "baseline", "--no-progress"]) == 2
    assert "holds files of an earlier validation run (trace0000.baseline.npz)" in capsys.readouterr().err


# --------------------------------------------------------------------------- two runs at once
def _two_at_once(cmd):
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    # Whoever takes the lock runs; the other is refused naming the owner or, if it gets
    # there after the first finished, resumes with nothing to do.
    assert codes in ([0, 0], [0, 2]), outs
    for proc, (_, stderr), other in zip(procs, outs, reversed(procs)):
        if proc.returncode == 2:
            assert "being written by another" in stderr and f"(pid {other.pid} on " in stderr, stderr
            assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr


def test_two_validate_runs_at_once_on_one_out_never_double_count(tmp_path):
    traces = _trace_file(tmp_path / "t.jsonl", 3)
    out = tmp_path / "o"
    _two_at_once([PY, "-m", "stepflow_tl", "validate", str(traces), "--model", "tiny", "--out", str(out),
                  "--conditions", "baseline,stepflow", "--max-key-steps", "2", "--n-boot", "200", "--no-progress"])
    from stepflow_tl.study.validate import read_validation

    _, records = read_validation(out / "results.jsonl")
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert pd.read_csv(out / "agreement.csv")["n_traces"].max() == 3


def test_two_saliency_runs_at_once_on_one_out_never_double_count(tmp_path):
    traces = _trace_file(tmp_path / "t.jsonl", 4)
    out = tmp_path / "o"
    _two_at_once([PY, "-m", "stepflow_tl", "saliency", str(traces), "--model", "tiny", "--out", str(out)])
    assert [r["index"] for r in load_saliency_maps(out).records] == [0, 1, 2, 3]
    assert pd.read_csv(out / "metrics.csv")["trace"].tolist() == [0, 1, 2, 3]
