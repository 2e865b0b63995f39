"""The demo's quick mode end to end (on the tiny random model, for speed)."""

from __future__ import annotations

import argparse

import pandas as pd

from stepflow_tl.cli.study import add_demo_arguments, run_demo_cli
from stepflow_tl.study.demo import QUICK


def test_quick_demo_writes_report_and_prints_honest_headline(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--quick", "--model", "tiny", "--out", str(tmp_path), "--no-progress"])
    assert run_demo_cli(args) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.html'}" in out
    assert "Wilson 95%" in out and "bootstrap 95% interval" in out and "not the embedded SmolLM2" in out
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["condition"].tolist() == list(QUICK.conditions)
    n = len(QUICK.levels) * QUICK.n_per_level
    assert summary["n"].tolist() == [n] * len(QUICK.conditions)
    html = (tmp_path / "report.html").read_text()
    assert "Accuracy by difficulty" in html and "Read these numbers for what they are" in html
    # which split cut the answers into steps, in the printout and the report
    assert "steps: plain format, 'lines' split (format and split 'auto')" in out
    assert "steps: plain format, split 'lines' (auto)" in html.replace("&#x27;", "'").replace("&#39;", "'")
    # A second run resumes from results.jsonl: nothing left to generate, same numbers.
    assert run_demo_cli(args) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary.csv").drop(columns="wall_time_s"),
                                  summary.drop(columns="wall_time_s"))
