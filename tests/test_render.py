"""Rendering: circuitsvis step maps, matplotlib figures, and the offline HTML report."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from scipy import stats

from stepflow_tl.errors import StepflowError
from stepflow_tl.saliency.maps import StepSaliency
from stepflow_tl.viz.plots import (
    _mean_band,
    plot_accuracy_by_difficulty,
    plot_group_bands,
    plot_metric_curves,
    plot_step_map,
)
from stepflow_tl.saliency.diagnostics import METRIC_LEGEND, diagnose
from stepflow_tl.viz.report import Report, save_result_html
from stepflow_tl.viz.stepmaps import _circuitsvis_props, circuitsvis_bundle, step_axis_labels, step_map_data

XSS = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"


def make_result(n_layers=4, n_steps=6, seed=0, labels=None, meta=None) -> StepSaliency:
    g = torch.Generator().manual_seed(seed)
    # Lower-triangular like real causal step maps; deeper layers larger so scales differ.
    depth = torch.arange(1, n_layers + 1, dtype=torch.float64)[:, None, None]
    maps = torch.rand(n_layers, n_steps, n_steps, generator=g, dtype=torch.float64).tril() * depth
    kinds = ["question"] + ["thinking"] * (n_steps - 2) + ["summary"]
    if labels is None:
        labels = [f"{k[0].upper()}{i}: step {i} text" for i, k in enumerate(kinds)]
    return StepSaliency(
        maps=maps,
        layers=list(range(2, 2 + n_layers)),
        n_model_layers=n_layers + 2,
        step_kinds=kinds,
        step_labels=labels,
        loss="mean next-token cross-entropy",
        meta=meta if meta is not None else {"trace_id": "t0", "correct": True},
    )


def script_bodies(page: str) -> list[str]:
    return re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.DOTALL | re.IGNORECASE)


def strip_scripts(page: str) -> str:
    """The page without its script elements (the bundle itself contains the text "<script")."""
    return re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL | re.IGNORECASE)


# ----------------------------------------------------------------------------- labels and data


def test_step_axis_labels_unique_truncated_and_from_kinds():
    labels = step_axis_labels(["T1: same", "T1: same", "x" * 100])
    assert len(set(labels)) == 3
    assert labels[0] == "T1: same #0" and labels[1] == "T1: same #1"
    assert len(labels[2]) <= 28 and labels[2].endswith("\u2026")
    assert step_axis_labels(kinds=["question", "thinking", "summary"]) == ["Q0", "T1", "S2"]
    assert step_axis_labels(n_steps=2) == ["step 0", "step 1"]
    # Newlines/tabs inside a label collapse to single spaces.
    assert step_axis_labels(["a\n\tb"]) == ["a b"]


def test_step_map_data_reads_result_fields():
    r = make_result()
    d = step_map_data(r)
    assert d.maps.dtype == np.float64 and d.maps.shape == (4, 6, 6)
    np.testing.assert_array_equal(d.maps, r.maps.numpy())
    assert d.layers == [2, 3, 4, 5]
    assert d.kinds == r.step_kinds
    assert (d.map_kind, d.pool, d.loss) == ("saliency", "mean", "mean next-token cross-entropy")
    assert d.global_max == pytest.approx(float(r.maps.max()))
    # A plain 2-D array is one layer.
    assert step_map_data(np.eye(3), ["a", "b", "c"]).maps.shape == (1, 3, 3)


@pytest.mark.parametrize(
    "maps, labels, kwargs, match",
    [
        (np.zeros((2, 3, 4)), None, {}, "step_q == step_k"),
        (np.zeros((2, 2, 3, 3)), None, {}, "layer, step_q, step_k"),
        (np.full((1, 2, 2), np.nan), None, {}, "NaN"),
        (np.zeros((1, 3, 3)), ["a", "b"], {}, "expected 3 step labels"),
        (np.zeros((2, 3, 3)), None, {"layers": [0]}, "expected 2 layer indices"),
        (np.zeros((1, 3, 3)), None, {"map_kind": "gradients"}, "map_kind"),
        ("not numbers", None, {}, "numeric array"),
    ],
)
def test_step_map_data_rejects_bad_input(maps, labels, kwargs, match):
    with pytest.raises(StepflowError, match=match):
        step_map_data(maps, labels, **kwargs)


def test_circuitsvis_props_share_one_colour_scale():
    r = make_result()
    d = step_map_data(r)
    props, scale = _circuitsvis_props(d, "global")
    att = np.array(props["attention"])
    assert att.shape == (4, 6, 6)
    assert scale == pytest.approx(d.global_max)
    assert att.max() == pytest.approx(1.0)
    assert props["maxValue"] == 1.0 and props["maskUpperTri"] is True
    # One divisor for all layers: per-layer maxima keep their ratios (up to 4-decimal rounding).
    per_layer_max = d.maps.reshape(4, -1).max(axis=1)
    np.testing.assert_allclose(att.reshape(4, -1).max(axis=1), per_layer_max / d.global_max, atol=1e-4)
    assert att.reshape(4, -1).max(axis=1)[0] < 0.5  # the shallow layer is visibly lighter
    assert props["attentionHeadNames"] == ["L2", "L3", "L4", "L5"]
    assert all(" " not in t for t in props["tokens"]) and len(set(props["tokens"])) == 6


def test_circuitsvis_props_row_normalised():
    d = step_map_data(make_result())
    props, scale = _circuitsvis_props(d, "row")
    att = np.array(props["attention"]) * scale
    np.testing.assert_allclose(att.sum(axis=-1), 1.0, atol=1e-3)


# ----------------------------------------------------------------------------- figures


def test_plot_metric_curves_frame_dict_and_groups():
    df = pd.DataFrame({"layer": [0, 1, 2, 0, 1, 2], "LI": [1.0, 2.0, 3.0, 3.0, 4.0, 5.0], "trace": list("aaabbb")})
    fig = plot_metric_curves(df, "LI")
    assert isinstance(fig, Figure)
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 3.0, 4.0])  # averaged over traces
    fig = plot_metric_curves(df, "LI", by="trace")
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["a", "b"]
    fig = plot_metric_curves({"x": [0.1, 0.2], "y": df[df.trace == "b"]}, "LI")
    ys = [list(ln.get_ydata()) for ln in fig.axes[0].get_lines()]
    assert ys == [[0.1, 0.2], [3.0, 4.0, 5.0]]
    with pytest.raises(StepflowError, match="lacks column"):
        plot_metric_curves(df, "DS")
    with pytest.raises(StepflowError, match="grouping column"):
        plot_metric_curves(df, "LI", by="nope")


def test_mean_band_t_interval_matches_scipy():
    rng = np.random.default_rng(1)
    vals = rng.normal(size=(12, 3))
    mean, low, high = _mean_band(vals, "t", 0, 0)
    for j in range(3):
        lo, hi = stats.t.interval(0.95, 11, loc=vals[:, j].mean(), scale=stats.sem(vals[:, j]))
        assert (low[j], high[j]) == pytest.approx((lo, hi))
    np.testing.assert_allclose(mean, vals.mean(axis=0))


def test_mean_band_bootstrap_is_seeded_and_contains_mean():
    vals = np.random.default_rng(2).normal(size=(20, 4))
    a = _mean_band(vals, "bootstrap", 500, 7)
    b = _mean_band(vals, "bootstrap", 500, 7)
    np.testing.assert_array_equal(a[1], b[1])
    assert np.all(a[1] < a[0]) and np.all(a[0] < a[2])
    # A single trace has no interval.
    assert np.isnan(_mean_band(vals[:1], "t", 0, 0)[1]).all()


def test_plot_group_bands_from_frames_and_arrays():
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 0.1, size=(8, 5))
    rows = [{"trace": t, "layer": l, "DS": rng.normal()} for t in range(6) for l in range(5)]
    fig = plot_group_bands(a, pd.DataFrame(rows), "DS")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["correct (n=8)", "incorrect (n=6)"]
    np.testing.assert_allclose(lines[0].get_ydata(), a.mean(axis=0))
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2
    fig = plot_group_bands(list(a), a[:3], "DS", band="bootstrap", n_boot=200, labels=("A", "B"))
    assert fig.axes[0].get_lines()[1].get_label() == "B (n=3)"
    with pytest.raises(StepflowError, match="band"):
        plot_group_bands(a, a, "DS", band="normal")
    with pytest.raises(StepflowError, match="lacks column"):
        plot_group_bands(pd.DataFrame({"layer": [0], "DS": [1.0]}), a, "DS")


def test_plot_step_map_draws_the_map():
    m = np.tril(np.arange(16, dtype=float).reshape(4, 4))
    fig = plot_step_map(m, ["a", "b", "c", "d"], title="layer 3", vmax=30.0)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), m)
    assert ax.images[0].get_clim() == (0.0, 30.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "d"]
    with pytest.raises(StepflowError, match="square"):
        plot_step_map(np.zeros((2, 3)))


def test_plot_accuracy_by_difficulty_error_bars():
    df = pd.DataFrame(
        {
            "condition": ["base", "base", "stepflow", "stepflow"],
            "difficulty": [2, 1, 1, 2],
            "accuracy": [0.4, 0.8, 0.85, 0.5],
            "low": [0.3, 0.7, 0.75, 0.35],
            "high": [0.5, 0.9, 0.95, 0.6],
        }
    )
    fig = plot_accuracy_by_difficulty(df)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]  # numeric levels sorted
    base = ax.containers[0]
    np.testing.assert_allclose(np.asarray(base.lines[0].get_ydata(), dtype=float), [0.8, 0.4])
    segs = base.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segs], [(0.7, 0.9), (0.3, 0.5)])
    with pytest.raises(StepflowError, match="missing"):
        plot_accuracy_by_difficulty(df.drop(columns="low"))
    with pytest.raises(StepflowError, match="low <= accuracy <= high"):
        plot_accuracy_by_difficulty(df.assign(low=0.99))


# ----------------------------------------------------------------------------- report


def test_bundle_is_inlinable():
    js = circuitsvis_bundle()
    assert "var CircuitsVis=" in js
    assert "</script" not in js.lower()
    assert "sourceMappingURL" not in js


def test_report_escapes_text_tables_and_captions(tmp_path):
    rep = Report(f"title {XSS}")
    rep.add_heading(XSS)
    rep.add_text(f"para one {XSS}\n\npara two & more")
    rep.add_table(pd.DataFrame({XSS: [XSS_IMG, 1.23456789]}), caption=XSS)
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    rep.add_figure(fig, caption=XSS)
    page = rep.save(tmp_path / "r.html").read_text(encoding="utf-8")
    assert XSS not in page and "<img src=x" not in page
    assert html.escape(XSS) in page and html.escape(XSS_IMG) in page
    assert "1.235" in page
    assert page.count('<p class="text">') == 2
    # No step maps: no script at all, and the policy forbids scripts.
    assert "<script" not in page
    assert "script-src 'none'" in html.unescape(page)
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


def _xss_result():
    labels = [f"Q0: {XSS}", f"T1: {XSS_IMG}", "T2: </script><b>x</b>", "T3: a & b", "T4: ok", "S5: done"]
    meta = {"trace_id": "x<1>", "question": f"{XSS} What is 2+2?", "correct": False}
    return make_result(labels=labels, meta=meta)


def test_report_with_step_maps_is_offline_and_has_no_injected_script(tmp_path):
    rep = Report("two traces")
    rep.add_step_maps(_xss_result(), "first")
    rep.add_step_maps(make_result(n_layers=2, n_steps=3, seed=1).maps, "second", labels=["a", "b", "c"])
    page = rep.save(tmp_path / "r.html").read_text(encoding="utf-8")
    bodies = script_bodies(page)
    # One inlined bundle for the whole page, one small script with both render calls.
    assert len(bodies) == 2 and strip_scripts(page).lower().count("<script") == 0
    assert page.count("var CircuitsVis=") == 1
    assert bodies[1].count("CircuitsVis.render(") == 2
    assert XSS not in page and "<img src=x" not in page and "</script><b>" not in page
    # The payload reaches circuitsvis only as escaped JSON text.
    assert "\\u003cscript\\u003ealert(1)\\u003c/scrip" in bodies[1]
    assert "\\u003c/script\\u003e\\u003cb\\u003ex" in bodies[1]
    # Nothing is fetched from anywhere: no src/href to a host, no link elements.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.IGNORECASE)
    assert "<link" not in page.lower()
    # The CSP lists exactly the hashes of the two scripts.
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    for body in bodies:
        digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp.split("script-src")[1]


def test_render_props_round_trip_through_json(tmp_path):
    r = _xss_result()
    rep = Report("r")
    rep.add_step_maps(r, view="global")
    body = script_bodies(rep.to_html())[1]
    props = json.loads(re.search(r"CircuitsVis\.AttentionHeads, (\{.*\})\); \}", body).group(1))
    # The browser gets the original characters back (cut to 28 characters, spaces as middle dots).
    assert props["tokens"][0] == "Q0:\u00b7<script>alert(1)</scrip\u2026"
    np.testing.assert_allclose(np.array(props["attention"]) * step_map_data(r).global_max, r.maps.numpy(), atol=1e-3 * float(r.maps.max()))


def test_save_result_html_states_provenance_and_legend(tmp_path):
    r = _xss_result()
    diag = {"LI": [0.5, 0.4, 0.3, 0.2], "DS": np.array([0.3, 0.3, 0.2, 0.1]), "anomaly ratio": 1.7}
    path = save_result_html(r, tmp_path / "sub" / "res.html", diagnostics=diag, legend=METRIC_LEGEND)
    page = path.read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<script.*?</script>", "", page, flags=re.DOTALL))
    for needle in ("map kind", "saliency", "pool", "mean", "loss", "mean next-token cross-entropy",
                   "Metrics shown: LI, DS", "Per-trace diagnostics", "anomaly ratio", "1.7"):
        assert needle in text, needle
    for name in METRIC_LEGEND:
        assert name in text
    assert "sum_{j <= i}" in text
    assert XSS not in page and html.escape(f"{XSS} What is 2+2?") in page
    # Static fallback heatmaps of the shallowest and deepest layers, plus two metric curves.
    assert page.count("data:image/png;base64,") == 4
    assert "2, 3, 4, 5" in text


def test_save_result_html_accepts_frames_and_attention_maps(tmp_path):
    r = make_result()
    r.map_kind, r.pool = "attention", "causal_mean"
    diag = pd.DataFrame({"layer": r.layers, "QT": [0.1, 0.2, 0.3, 0.4]})
    page = save_result_html(r, tmp_path / "a.html", diagnostics=diag).read_text(encoding="utf-8")
    assert "attention probabilities" in page and "causal_mean" in page and "QT by layer" in page
    with pytest.raises(StepflowError, match="same length"):
        save_result_html(r, tmp_path / "b.html", diagnostics={"LI": [1, 2], "DS": [1, 2, 3]})


# ----------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dump_dom(path, profile_dir) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile_dir}", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium_offline(tmp_path):
    path = save_result_html(_xss_result(), tmp_path / "report.html", diagnostics={"LI": [0.5, 0.4, 0.3, 0.2]})
    dom = chromium_dump_dom(path, tmp_path / "profile")
    view = re.search(r'<div id="stepflow-cv-0" class="cv-view">(.*?)</noscript>', dom, flags=re.DOTALL)
    assert view, "the circuitsvis container is missing"
    inner = view.group(1)
    # What the AttentionHeads React component renders: its selector heading, one small panel
    # per layer with the layer name, a zoomed panel, and chart.js canvases.
    assert "Head Selector" in inner and "L2 Zoomed" in inner
    for layer in (2, 3, 4, 5):
        assert re.search(rf"<h4[^>]*>L{layer}</h4>", inner)
    assert inner.count("<canvas") == 5
    assert "circuitsvis failed" not in strip_scripts(dom)
    # The injected markup stayed text: no extra element, no attribute set by an onerror handler.
    assert not re.search(r"<body[^>]*data-pwned", dom)
    assert not re.search(r"<img[^>]*onerror", dom)
    assert len(script_bodies(dom)) == 2 and "<script" not in strip_scripts(dom)


@dataclass
class FakeDiagnostics:
    """Stand-in with the shape of stepflow_tl.diagnostics.Diagnostics."""

    per_layer: pd.DataFrame
    notes: dict

    def to_dataframe(self) -> pd.DataFrame:
        return self.per_layer.copy()

    def summary(self, *, include_meta: bool = True) -> dict:
        return {"li_shallow": 0.61, "ds_slope_deep": -0.02}


def test_save_result_html_with_diagnostics_object(tmp_path):
    r = make_result()
    per_layer = pd.DataFrame(
        {"layer": r.layers, "band": ["shallow", "middle", "middle", "deep"], "lock_in": [0.6, 0.5, 0.4, 0.3],
         "anomaly_ratio": [1.0, 1.1, 1.2, np.nan]}
    )
    diag = FakeDiagnostics(per_layer, {"anomaly_ratio": f"no summary rows {XSS}"})
    page = save_result_html(r, tmp_path / "d.html", diagnostics=diag, legend=METRIC_LEGEND).read_text(encoding="utf-8")
    text = html.unescape(strip_scripts(page))
    assert "Metrics shown: lock_in, anomaly_ratio" in text  # the string column "band" is no metric
    assert "li_shallow" in text and "-0.02" in text and "no summary rows" in text
    assert "LI (lock_in)" in text and "r_i = sum_{j <= i}" in text
    assert XSS not in page


# ----------------------------------------------------------------------------- tables for people


def test_readable_table_rounds_merges_intervals_and_hides_missing_values():
    from stepflow_tl.viz.tables import readable_table

    frame = pd.DataFrame({
        "condition": ["baseline", "stepflow"], "n": [6, 6], "accuracy": [0.5, 0.6666666],
        "acc_low": [0.18761, 0.3], "acc_high": [0.81239, 0.9000123], "n_changed": [0, pd.NA],
        "diff": [0.0, 0.1666666], "diff_low": [0.0, -0.0833], "diff_high": [0.0, 0.5],
        "b01": [pd.NA, 2], "mcnemar_p": [np.nan, 0.00004], "p_holm": [np.nan, 0.0456789],
        "time_ratio": [1.0, 1.23456], "mean_tokens": [41.33333, 1234.5],
    })
    t = readable_table(frame, kinds={"accuracy": "pct", "acc_low": "pct", "diff": "pp", "time_ratio": "ratio"},
                       headers={"acc_low": "accuracy 95% CI"})
    assert t.headers == ["condition", "n", "accuracy", "accuracy 95% CI", "changed outputs", "diff (95% CI)",
                         "only condition right", "McNemar p", "p (Holm)", "time ratio", "mean tokens"]
    base, step = (dict(zip(t.headers, r)) for r in t.rows)
    assert step["accuracy"] == "66.7%" and step["accuracy 95% CI"] == "[30.0%, 90.0%]"
    assert step["diff (95% CI)"] == "+16.7 pp [-8.3, +50.0]" and base["diff (95% CI)"] == "+0.0 pp [+0.0, +0.0]"
    assert step["McNemar p"] == "<0.001" and step["p (Holm)"] == "0.046" and step["time ratio"] == "1.23\u00d7"
    assert step["mean tokens"] == "1,234" and base["mean tokens"] == "41.3" and step["only condition right"] == "2"
    assert base["McNemar p"] == base["only condition right"] == step["changed outputs"] == "\u2014"
    cells = [c for r in t.rows for c in r]
    assert not any(bad in c for c in cells for bad in ("nan", "<NA>", "None"))
    assert t.numeric == [False] + [True] * 10
    merged = readable_table(frame, kinds={"accuracy": "pct"}, estimates={"acc_low": "accuracy"})
    assert merged.rows[1][merged.headers.index("accuracy (95% CI)")] == "66.7% [30.0%, 90.0%]"
    with pytest.raises(StepflowError, match="unknown column kind"):
        readable_table(frame, kinds={"n": "percent"})


def test_report_tables_are_for_people_and_never_wrap_numbers():
    rep = Report("t")
    rep.add_table(pd.DataFrame({"metric": ["lock_in"], "ci_low": [0.1], "ci_high": [0.2], "p": [np.nan]}))
    page = rep.to_html()
    assert "<th class=\"num\">95% CI</th>" in page and "[0.100, 0.200]" in page and "nan" not in page.split("<body>")[1]
    assert re.search(r"table\.data th \{[^}]*white-space: nowrap", page)
    assert re.search(r"td\.num \{[^}]*white-space: nowrap", page)


# ----------------------------------------------------------------------------- step-map views


def test_views_colour_real_structure_and_say_which_view_it_is():
    from stepflow_tl.viz.stepmaps import DEFAULT_VIEW, LOG_DECADES, VIEWS, band_panels, view_values

    # A few dominant diagonal cells and a faint off-diagonal pattern, as in real traces.
    m = np.tril(np.full((2, 5, 5), 1e-2)) + np.eye(5)[None] * np.array([1.0, 50.0])[:, None, None]
    glob, scale = view_values(m, "global")
    assert scale == pytest.approx(50.01) and glob[0, 3, 1] < 1e-3  # white on the one global scale
    row_log, _ = view_values(m, "row_log")
    share = 1e-2 / (1 + 4e-2)
    assert row_log[0, 3, 1] == pytest.approx(1 + np.log10(share) / LOG_DECADES)  # visible: ~0.33
    assert row_log[0, 0, 0] == 1.0 and row_log[1, 3, 1] == 0.0  # below 0.1% of the row: white
    assert (row_log[:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0).all()
    layer, _ = view_values(m, "layer")
    assert layer[0].max() == layer[1].max() == 1.0
    row, top = view_values(m, "row")
    np.testing.assert_allclose((row * top).sum(-1), 1.0)
    assert DEFAULT_VIEW == "row_log" and set(VIEWS) == {"row_log", "row", "layer", "layer_log", "global"}
    with pytest.raises(StepflowError, match="unknown step-map view"):
        view_values(m, "linear")
    d = step_map_data(make_result())
    panels, names = band_panels(d, {"shallow": [0, 1, 2], "middle": [3, 4], "deep": [5]})
    assert names == ["shallow L2", "middle L3-4", "deep L5"]
    np.testing.assert_allclose(panels[1], d.maps[1:3].mean(0))


def test_report_names_the_view_and_draws_band_panels(tmp_path):
    r = make_result()
    rep = Report("v")
    rep.add_step_maps(r, "default")
    rep.add_step_maps(r, "bands", view="layer", bands={"shallow": [2], "deep": [4, 5]})
    with pytest.warns(DeprecationWarning, match="row_normalise"):
        rep.add_step_maps(r, "old", row_normalise=True)
    page = html.unescape(rep.to_html())
    assert "View 'row_log': each cell as its share" in page and "View 'layer'" in page and "View 'row'" in page
    props = [json.loads(p) for p in re.findall(r"CircuitsVis\.AttentionHeads, (\{.*?\})\); \}", script_bodies(rep.to_html())[1])]
    assert props[1]["attentionHeadNames"] == ["shallow L2", "deep L4-5"] and len(props[1]["attention"]) == 2
    # StepSaliency.save_html: the diagnostics' own legend and band means, no restated copy in viz
    page = html.unescape(r.save_html(tmp_path / "r.html", diagnostics=diagnose(r)).read_text(encoding="utf-8"))
    assert "Band means" in page and all(name in page for name in METRIC_LEGEND)
