"""The examples run, in their quick mode, as a researcher would start them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *args],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.smollm2
def test_analyse_trace(tmp_path):
    out = _run("analyse_trace.py", tmp_path, "--out", str(tmp_path / "a"))
    assert "li_shallow=" in out and "ds_deep=" in out
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000
    assert list((tmp_path / "a").glob("step_map_layer*.png"))


@pytest.mark.smollm2
def test_step_knockout(tmp_path):
    out = _run("step_knockout.py", tmp_path)
    assert "knock out 'Q0:" in out and "change in summary log-prob" in out


@pytest.mark.smollm2
def test_ablation_study(tmp_path):
    out = _run("ablation_study.py", tmp_path, "--out", str(tmp_path / "s"))
    assert "baseline" in out and "stepflow" in out
    assert (tmp_path / "s" / "report.html").exists()
    assert len((tmp_path / "s" / "results.jsonl").read_text().splitlines()) >= 6
