"""`StepSaliency.show()` in a notebook: a circuitsvis object that renders offline."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
import torch
from circuitsvis.utils.render import RenderedHTML

from stepflow_tl import StepSaliency
from stepflow_tl.viz import StepMapsView, step_maps_view
from stepflow_tl.viz.stepmaps import circuitsvis_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _result() -> StepSaliency:
    maps = torch.rand(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).tril()
    return StepSaliency(
        maps=maps, layers=[0, 1, 2], n_model_layers=3,
        step_kinds=["question", "thinking", "thinking", "summary"],
        step_labels=["Q0: What is 2+2?", "T1: 2+2", "T2: = 4", "S3: Answer: 4"],
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test (circuitsvis' own objects probe it)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the notebook view tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _display_html(obj) -> str:
    """What Jupyter does with a cell's value: ask it for its text/html representation."""
    return obj._repr_html_()


def test_show_returns_a_circuitsvis_object(no_network):
    view = _result().show()
    assert isinstance(view, RenderedHTML) and isinstance(view, StepMapsView)
    html = _display_html(view)
    assert html == view.local_src == view.cdn_src


def test_shown_page_is_self_contained(no_network):
    html = _display_html(_result().show())
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    assert len(scripts) == 1 and "<script" not in re.sub(r"<script>.*?</script>", "", html, flags=re.DOTALL)
    # The installed circuitsvis bundle is inlined whole; nothing is imported from a CDN.
    assert scripts[0].startswith(circuitsvis_bundle())
    assert "unpkg.com" not in html and "import " not in scripts[0][len(circuitsvis_bundle()):]
    call = scripts[0][len(circuitsvis_bundle()):]
    view_id = re.search(r'<div id="([^"]+)"', html).group(1)
    assert f'CircuitsVis.render("{view_id}", CircuitsVis.AttentionHeads, ' in call
    # One colour scale over all layers: maps divided by the global max, maxValue 1.
    assert '"maxValue": 1.0' in call and '"attentionHeadNames": ["L0", "L1", "L2"]' in call


def test_each_view_gets_its_own_element():
    a, b = step_maps_view(_result()), step_maps_view(_result())
    assert re.search(r'<div id="([^"]+)"', a.local_src).group(1) != re.search(r'<div id="([^"]+)"', b.local_src).group(1)


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_shown_page_renders_in_headless_chromium_offline(tmp_path):
    html = _result().show()._repr_html_()
    page = tmp_path / "cell.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{html}</body></html>",
                    encoding="utf-8")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Head Selector" in dom
    for layer in (0, 1, 2):
        assert re.search(rf"<h4[^>]*>L{layer}</h4>", dom)
