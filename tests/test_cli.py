"""The stepflow-tl command line, end to end on the tiny model."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from stepflow_tl.cli.common import parse_layers
from stepflow_tl.cli.main import main


def _records(n):
    for i in range(n):
        yield {
            "question": f"Sam has {i + 2} pens and buys 3 more. How many pens does he have?",
            "output": f"Sam starts with {i + 2} pens.\n\nHe buys 3, so {i + 2} + 3 = {i + 5}.\n\n"
                      f"Check: {i + 5} - 3 = {i + 2}.\n</think>\n\nAnswer: \\boxed{{{i + 5}}}",
            "correct": i % 2 == 0,
            "gold": str(i + 5),
        }


def test_python_dash_m_runs_the_cli():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "stepflow_tl", "--help"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "{info,saliency,generate,eval,ablate,demo,validate,resample}" in done.stdout


def test_info_prints_the_model(capsys):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    for field in ("backend", "n_layers", "n_kv_heads", "d_model", "device", "dtype", "weights"):
        assert field in out
    assert "bridge" in out


def test_saliency_writes_maps_metrics_and_report(tmp_path, capsys):
    traces = tmp_path / "traces.jsonl"
    # two problems the model solves often, two it rarely solves: the authors' accuracy split
    records = [{**r, "accuracy": a} for r, a in zip(_records(4), (0.9, 0.8, 0.2, 0.1))]
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert main(["saliency", str(traces), "--model", "tiny", "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 4 and "li_shallow" in metrics.columns
    assert (out / "trace0003.npz").exists() and (out / "trace0003.json").exists()
    html = (out / "report.html").read_text()
    assert "Diagnostics per trace" in html and "https://" not in html.split("<script")[0]
    assert (out / "compare.csv").exists()
    by_accuracy = pd.read_csv(out / "compare_accuracy.csv")
    layers = by_accuracy[by_accuracy["level"] == "layer"]
    assert (layers["n_high_accuracy"] == 2).all() and (layers["n_low_accuracy"] == 2).all()


def test_generate_json(capsys):
    assert main(["generate", "What is 2 + 2?", "--model", "tiny", "--max-new-tokens", "5", "--stepflow", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["output_ids"]) == 5 and result["interventions"]
    assert {"text", "trace", "events", "tokens_per_s"} <= set(result)


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert main(["saliency", str(missing), "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "stepflow-tl: error:" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "no-such-model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_layer_specs():
    assert parse_layers("bottom_quarter") == "bottom_quarter"
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(Exception, match="expected a band"):
        parse_layers("shallow")


# --------------------------------------------------------------------------- flags and user errors
from stepflow_tl.cli.generation import interventions_from_args  # noqa: E402
from stepflow_tl.cli.main import build_parser  # noqa: E402
from stepflow_tl.interventions import OddsEqualBridge, StepFlow  # noqa: E402


def _parts(argv):
    ivs = interventions_from_args(build_parser().parse_args(["generate", "q", *argv]))
    flat = [p for iv in ivs for p in (iv.parts() if isinstance(iv, StepFlow) else [iv])]
    return ivs, {type(p).__name__: p for p in flat}


@pytest.mark.parametrize("argv, expected", [
    (["--stepflow"], {"OddsEqualBridge": ("bottom_quarter", 0.15), "StepMomentum": ("top_quarter", 0.06, 0.0)}),
    (["--stepflow", "--tau-max", "0.3", "--alpha", "0.5"],
     {"OddsEqualBridge": ("bottom_quarter", 0.3), "StepMomentum": ("top_quarter", 0.5, 0.0)}),
    (["--stepflow", "--oeb", "0-1", "--beta", "0.5"],
     {"OddsEqualBridge": ([0, 1], 0.15), "StepMomentum": ("top_quarter", 0.06, 0.5)}),
    (["--oeb", "0", "--tau-max", "0.2"], {"OddsEqualBridge": ([0], 0.2)}),
    (["--smi", "1", "--alpha", "-0.1", "--beta", "0.25"], {"StepMomentum": ([1], -0.1, 0.25)}),
    (["--oeb", "all", "--smi", "top_quarter", "--tau-max", "0.1", "--alpha", "0.2"],
     {"OddsEqualBridge": ("all", 0.1), "StepMomentum": ("top_quarter", 0.2, 0.0)}),
    ([], {}),
])
def test_every_generate_flag_takes_effect_where_it_is_meaningful(argv, expected):
    ivs, parts = _parts(argv)
    assert (len(ivs) == 1 and isinstance(ivs[0], StepFlow)) == ("--stepflow" in argv)
    assert set(parts) == set(expected)
    for name, values in expected.items():
        p = parts[name]
        got = (p.layers, p.tau_max) if isinstance(p, OddsEqualBridge) else (p.layers, p.alpha, p.beta)
        assert got == values


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # after any progress bar
    assert "Traceback" not in err and err.count("stepflow-tl: error: ") == 1 and last.startswith("stepflow-tl: error: ")
    assert re.search(match, err), err
    return err


@pytest.mark.parametrize("argv, match", [
    (["--tau-max", "0.3"], r"--tau-max has no effect without --oeb LAYERS or --stepflow"),
    (["--smi", "1", "--tau-max", "0.3"], r"--tau-max has no effect"),
    (["--alpha", "0.5"], r"--alpha has no effect without --smi LAYERS or --stepflow"),
    (["--oeb", "0", "--beta", "0.5"], r"--beta has no effect"),
    (["--temperature", "0.3"], r"--temperature has no effect without --sample"),
    (["--top-p", "0.5", "--seed", "3"], r"--top-p and --seed have no effect without --sample"),
    (["--stepflow", "--tau-max", "1.5"], r"--oeb/--tau-max: OddsEqualBridge: tau_max must be a finite number in "
                                         r"\[0.0, 1.0\), got 1.5"),
    (["--oeb", "0", "--tau-max", "nan"], r"tau_max must be a finite number"),
    (["--smi", "1", "--alpha", "inf"], r"alpha must be a finite number"),
    (["--oeb", "30"], r"--oeb \[30\]: layers \[30\] are outside the model, which has 2 layers"),
    (["--stepflow", "--smi", "0-5"], r"--smi .*outside the model"),
])
def test_generate_refuses_flags_that_cannot_act_and_bad_values(capsys, argv, match):
    _one_line_error(capsys, ["generate", "q", "--model", "tiny", "--max-new-tokens", "2", *argv], match)


def test_study_flags_that_cannot_act_are_refused(tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "question": "What is 1 + 1?", "answer": "2"}) + "\n")
    out = str(tmp_path / "o")
    _one_line_error(capsys, ["eval", str(problems), "--model", "tiny", "--levels", "1", "--out", out],
                    r"--levels has no effect with a problem file")
    _one_line_error(capsys, ["eval", "--model", "tiny", "--temperature", "1", "--out", out],
                    r"--temperature has no effect without --do-sample")
    _one_line_error(capsys, ["eval", "--model", "tiny", "--conditions", "baseline,stepflw", "--out", out],
                    r"unknown condition 'stepflw'")
    _one_line_error(capsys, ["saliency", str(problems), "--model", "tiny", "--truncate", "--out", out],
                    r"--truncate has no effect without --max-tokens N")
    _one_line_error(capsys, ["eval", "--model", "tiny", "--samples", "3", "--out", out],
                    r"--samples 3 without --do-sample repeats the same greedy output 3 times")
    with pytest.raises(SystemExit) as exit_:
        main(["info", "tiny", "--model", "smollm2"])
    assert exit_.value.code == 2 and "info got two models" in capsys.readouterr().err


def test_user_errors_are_one_line_naming_the_input(tmp_path, capsys):
    null = tmp_path / "null.jsonl"
    null.write_text(json.dumps({"question": "Q?", "output": "ok"}) + "\n" + json.dumps({"question": "Q?", "output": None}) + "\n")
    _one_line_error(capsys, ["saliency", str(null), "--model", "tiny", "--out", str(tmp_path / "o")],
                    r"null\.jsonl, record 1: 'output' is null, not text; fill it in or drop the record")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(bytes(range(256)))
    for cmd in (["saliency", str(binary)], ["eval", str(binary)]):
        _one_line_error(capsys, [*cmd, "--model", "tiny", "--out", str(tmp_path / "o")],
                        r"is not a UTF-8 text file \(undecodable byte at offset 128\)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(capsys, ["saliency", str(empty), "--model", "tiny", "--out", str(tmp_path / "o")],
                    r"empty\.jsonl holds no trace records")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for cmd in (["saliency", str(null)], ["eval"], ["demo"]):
        _one_line_error(capsys, [*cmd, "--model", "tiny", "--out", str(a_file)],
                        rf"--out {re.escape(str(a_file))} is an existing file, not a directory")
    # a results file that is a directory (the file store's own refusal)
    (tmp_path / "o2" / "results.jsonl").mkdir(parents=True)
    _one_line_error(capsys, ["eval", "--model", "tiny", "--n-per-level", "1", "--levels", "1", "--out",
                             str(tmp_path / "o2")], r"results\.jsonl is a directory, not a results file")


def test_unwritable_output_and_os_errors_mid_run_are_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from stepflow_tl.saliency.maps import StepSaliency

    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in _records(2)))
    if os.geteuid() != 0:  # root writes anywhere; there the probe is simulated below
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o555)
        _one_line_error(capsys, ["saliency", str(traces), "--model", "tiny", "--out", str(locked / "out")],
                        r"is not writable \(Permission denied\)")
    real_write = type(tmp_path).write_bytes

    def read_only(self, data):
        if self.name.startswith(".stepflow-write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, data)

    with monkeypatch.context() as m:
        m.setattr(type(tmp_path), "write_bytes", read_only)
        _one_line_error(capsys, ["saliency", str(traces), "--model", "tiny", "--out", str(tmp_path / "ro2")],
                        r"--out .*ro2 is not writable \(Permission denied\); choose a directory you can write to")

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(StepSaliency, "save", full_disk)
    _one_line_error(capsys, ["saliency", str(traces), "--model", "tiny", "--out", str(tmp_path / "o")],
                    r"trace0000: No space left on device; free some disk space")


def test_a_bug_still_shows_its_traceback(monkeypatch):
    import stepflow_tl.cli.analysis as cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "cmd_info", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["info", "tiny"])

    def os_bug(args):
        raise OSError("short write")  # no file named: not the user's to fix

    monkeypatch.setattr(cli, "cmd_info", os_bug)
    with pytest.raises(OSError, match="short write"):
        main(["info", "tiny"])


def test_answer_loss_skips_traces_without_an_answer_names_them_and_writes_the_rest(tmp_path, capsys):
    records = list(_records(3))
    records.insert(1, {"question": "Q?", "output": "Thinking only.\n\nMore thinking.", "correct": False})
    records.append({"question": "Q?", "output": "Step one.\n\nStep two.\n</think>\n\nNo number here.",
                    "correct": True})
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "o"
    assert main(["saliency", str(traces), "--model", "tiny", "--loss", "answer", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 of 5 traces (records 1, 4)" in captured.err and "skipped.csv" in captured.err
    assert "wrote 3 maps" in captured.out
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["record"].tolist() == [1, 4] and skipped["reason"].str.contains("answer").all()
    assert pd.read_csv(out / "metrics.csv")["record"].tolist() == [0, 2, 3]
    assert sorted(p.name for p in out.glob("trace*.npz")) == ["trace0000.npz", "trace0002.npz", "trace0003.npz"]
    assert "Skipped traces" in (out / "report.html").read_text()
    # nothing measurable at all: an error, and still the report of what was skipped
    none = tmp_path / "none.jsonl"
    none.write_text("".join(json.dumps(r) + "\n" for r in (records[1], records[4])))
    _one_line_error(capsys, ["saliency", str(none), "--model", "tiny", "--loss", "answer", "--out",
                             str(tmp_path / "o2")], r"no trace of .* could be measured with --loss answer")
    assert (tmp_path / "o2" / "skipped.csv").exists() and (tmp_path / "o2" / "report.html").exists()


def test_engine_vllm_without_its_lane_is_one_line_and_writes_nothing(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this lane (tests/lane_vllm covers --engine vllm)")
    _one_line_error(capsys, ["generate", "What is 2 + 2?", "--engine", "vllm"], r"make \.venv-vllm")
    out = tmp_path / "study"
    _one_line_error(capsys, ["eval", "builtin", "--engine", "vllm", "--out", str(out)], r"make \.venv-vllm")
    _one_line_error(capsys, ["ablate", "builtin", "--engine", "vllm", "--out", str(out)], r"make \.venv-vllm")
    assert not out.exists()
