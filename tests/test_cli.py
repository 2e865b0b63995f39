"""The stepflow-tl command line, end to end on the tiny model."""

from __future__ import annotations

import json

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
    assert "{info,saliency,generate,eval,ablate,demo}" in done.stdout


def test_info_prints_the_model(capsys):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    for field in ("backend", "n_layers", "n_kv_heads", "d_model", "device", "dtype", "weights"):
        assert field in out
    assert "bridge" in out


def test_saliency_writes_maps_metrics_and_report(tmp_path, capsys):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in _records(4)))
    out = tmp_path / "out"
    assert main(["saliency", str(traces), "--model", "tiny", "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 4 and "li_shallow" in metrics.columns
    assert (out / "trace0003.npz").exists() and (out / "trace0003.json").exists()
    html = (out / "report.html").read_text()
    assert "Diagnostics per trace" in html and "https://" not in html.split("<script")[0]
    assert (out / "compare.csv").exists()


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
