import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch

from stepflow_tl.errors import StepflowError
from stepflow_tl.saliency.diagnostics import BANDS, METRICS, Diagnostics, band_layers, compare, diagnose


@dataclass
class FakeSaliency:
    """Stand-in with the fields of stepflow_tl.saliency.StepSaliency (contract 3)."""

    maps: torch.Tensor  # [layer, step_q, step_k] float64
    layers: list
    n_model_layers: int
    step_kinds: list
    step_labels: list = field(default_factory=list)
    map_kind: str = "saliency"
    pool: str = "mean"
    loss: str = "all_tokens"
    head_maps: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)


def make(maps, kinds, *, layers=None, n_model_layers=None, meta=None):
    maps = torch.as_tensor(np.asarray(maps, dtype=np.float64))
    if maps.ndim == 2:
        maps = maps[None]
    layers = list(range(maps.shape[0])) if layers is None else layers
    return FakeSaliency(
        maps=maps,
        layers=layers,
        n_model_layers=n_model_layers or maps.shape[0],
        step_kinds=list(kinds),
        step_labels=[f"{k[0].upper()}{i}" for i, k in enumerate(kinds)],
        meta=meta or {},
    )


# One layer, steps q, t, t, s; every value below is checked by hand.
HAND = np.array(
    [
        [2.0, 0.0, 0.0, 0.0],  # question
        [1.0, 3.0, 0.0, 0.0],  # thinking: LI 3/4, QT 1/4
        [1.0, 1.0, 2.0, 0.0],  # thinking: LI 2/4, QT 1/4
        [1.0, 2.0, 1.0, 4.0],  # summary: DS 3/8
    ]
)
HAND_KINDS = ["question", "thinking", "thinking", "summary"]


# ----------------------------------------------------------------- bands


def test_band_layers_defaults_and_explicit():
    b = band_layers(30)
    assert b["shallow"] == list(range(8)) and b["deep"] == list(range(22, 30))  # 7.5 rounds up
    assert b["middle"] == list(range(8, 22))
    assert band_layers(28) == {"shallow": list(range(7)), "middle": list(range(7, 21)), "deep": list(range(21, 28))}
    assert band_layers(2) == {"shallow": [0], "middle": [], "deep": [1]}  # at least one layer each
    assert band_layers(10, [0, 1], [9]) == {"shallow": [0, 1], "middle": list(range(2, 9)), "deep": [9]}
    assert band_layers(12, shallow=0.5, deep=0.1)["shallow"] == list(range(6))
    for args in [(1,), (4, [0, 3], [3]), (4, 0.0), (4, 1.5), (4, [7]), (0,), (4, "x")]:
        with pytest.raises(StepflowError):
            band_layers(*args)


# ----------------------------------------------------------------- exact values


@pytest.mark.filterwarnings("error")
def test_hand_built_map_exact_values():
    d = diagnose(make(HAND, HAND_KINDS, n_model_layers=1 + 3, layers=[0]), shallow=[0], deep=[3])
    row = d.per_layer.iloc[0]
    assert row["layer"] == 0 and row["band"] == "shallow"
    assert row["lock_in"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert row["question_share"] == pytest.approx(1 / 4)
    assert row["summary_thinking_share"] == pytest.approx(3 / 8)
    assert row["thinking_self"] == pytest.approx((3 + 0 + 1 + 2) / 4)  # full block incl. causal zero
    assert row["summary_self"] == pytest.approx(4.0)
    assert row["anomaly_ratio"] == pytest.approx(4.0 / 1.5)
    assert d.li_shallow == pytest.approx(0.625) and d.qt_shallow == pytest.approx(0.25)
    assert math.isnan(d.ds_deep) and "deep_band" in d.notes  # layer 3 not analysed


def test_self_block_lower_excludes_step_level_zeros():
    res = make(np.stack([HAND, HAND]), HAND_KINDS)
    full = diagnose(res, shallow=[0], deep=[1])
    low = diagnose(res, shallow=[0], deep=[1], self_block="lower")
    assert full.per_layer["thinking_self"].iloc[0] == pytest.approx(1.5)
    assert low.per_layer["thinking_self"].iloc[0] == pytest.approx(2.0)
    assert low.per_layer["anomaly_ratio"].iloc[0] == pytest.approx(2.0)
    with pytest.raises(StepflowError, match="self_block"):
        diagnose(res, shallow=[0], deep=[1], self_block="upper")


def test_recency_profile_exact():
    d = diagnose(make(np.stack([HAND, HAND]), HAND_KINDS), shallow=[0], deep=[1], recency_max=2)
    rec = d.recency_layers
    think = rec[(rec.layer == 0) & (rec.rows == "thinking")]["share"].to_numpy()
    summ = rec[(rec.layer == 0) & (rec.rows == "summary")]["share"].to_numpy()
    # thinking rows: (3/4, 1/4, 0) and (2/4, 1/4, 1/4) -> mean; summary: 4/8, 1/8, (2+1)/8
    np.testing.assert_allclose(think, [0.625, 0.25, 0.125])
    np.testing.assert_allclose(summ, [0.5, 0.125, 0.375])
    assert list(rec[rec.layer == 0]["label"].unique()) == ["0", "1", "2+"]
    band = d.recency
    assert set(band["band"].astype(str)) == {"shallow", "deep"}
    np.testing.assert_allclose(band.groupby(["band", "rows"], observed=True)["share"].sum(), 1.0)


def test_all_thinking_mass_on_diagonal_gives_lock_in_one():
    n = 6
    m = np.zeros((n, n))
    m[0, 0] = 1.0
    for i in range(1, n - 1):
        m[i, i] = 0.7 + 0.1 * i
    m[n - 1, 1 : n - 1] = 0.25  # summary: all mass on thinking
    kinds = ["question"] + ["thinking"] * (n - 2) + ["summary"]
    d = diagnose(make(m, kinds, n_model_layers=4, layers=[3]))
    row = d.per_layer.iloc[0]
    assert row["band"] == "deep"
    assert row["lock_in"] == 1.0 and row["question_share"] == 0.0
    assert row["summary_thinking_share"] == 1.0
    assert row["summary_self"] == 0.0 and row["anomaly_ratio"] == 0.0
    assert d.ds_deep == 1.0
    assert math.isnan(d.li_shallow)  # layer 0 was not analysed


def test_ds_slope_sign_and_value_over_deep_layers():
    n_layers = 8  # bands: shallow 0-1, deep 6-7
    ds_values = np.linspace(0.9, 0.2, n_layers)
    maps = []
    for ds in ds_values:
        m = np.zeros((4, 4))
        m[0, 0] = m[1, 1] = 1.0
        m[2, 1] = m[2, 2] = 0.5
        m[3, 1:3] = ds / 2  # thinking share ds
        m[3, 3] = 1 - ds
        maps.append(m)
    d = diagnose(make(np.stack(maps), ["question", "thinking", "thinking", "summary"]))
    np.testing.assert_allclose(d.per_layer["summary_thinking_share"], ds_values)
    step = ds_values[1] - ds_values[0]
    assert d.ds_slope_deep == pytest.approx(step) and d.ds_slope_deep < 0
    assert d.ds_deep == pytest.approx(ds_values[6:].mean())
    assert list(d.per_layer["band"]) == ["shallow"] * 2 + ["middle"] * 4 + ["deep"] * 2
    rising = diagnose(make(np.stack(maps[::-1]), ["question", "thinking", "thinking", "summary"]))
    assert rising.ds_slope_deep == pytest.approx(-step)


def test_several_summary_rows_are_averaged():
    m = np.array(
        [
            [1.0, 0, 0, 0],
            [0.5, 0.5, 0, 0],
            [0.0, 1.0, 1.0, 0],  # DS 1/2
            [0.0, 3.0, 0.0, 1.0],  # DS 3/4
        ]
    )
    d = diagnose(make(m, ["question", "thinking", "summary", "summary"], n_model_layers=4, layers=[3]))
    assert d.per_layer["summary_thinking_share"].iloc[0] == pytest.approx((0.5 + 0.75) / 2)
    assert d.per_layer["summary_self"].iloc[0] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert d.n_steps == {"question": 1, "thinking": 1, "summary": 2}


# ----------------------------------------------------------------- NaN handling


@pytest.mark.filterwarnings("error")
def test_no_summary_gives_nan_with_reason():
    m = HAND[:3, :3]
    d = diagnose(make(np.stack([m, m, m, m]), HAND_KINDS[:3]))
    pl = d.per_layer
    assert pl["summary_thinking_share"].isna().all() and pl["anomaly_ratio"].isna().all()
    assert pl["summary_self"].isna().all()
    assert np.allclose(pl["lock_in"], 0.625)
    assert math.isnan(d.ds_deep) and math.isnan(d.ds_slope_deep) and math.isnan(d.anomaly_deep)
    assert "no summary" in d.notes["summary_thinking_share"]
    assert "ds_slope_deep" not in d.notes  # already explained by the DS note
    assert set(d.recency_layers["rows"]) == {"thinking"}


@pytest.mark.filterwarnings("error")
def test_zero_rows_and_zero_layers_are_nan_without_warnings():
    zero = np.zeros((4, 4))
    d = diagnose(make(np.stack([HAND, zero, HAND, HAND]), HAND_KINDS))
    pl = d.per_layer
    assert pl.loc[1, METRICS[:3]].isna().all()
    assert math.isnan(pl.loc[1, "anomaly_ratio"])  # 0 / 0
    assert pl.loc[1, "summary_self"] == 0.0 and pl.loc[1, "thinking_self"] == 0.0
    assert pl.loc[0, "lock_in"] == pytest.approx(0.625)
    assert "zero mass" in d.notes["rows"] and "anomaly_ratio" in d.notes
    assert d.recency_layers[d.recency_layers.layer == 1]["share"].isna().all()
    # One zero row among others: left out of the mean, not counted as 0.
    m = HAND.copy()
    m[2] = 0.0
    one = diagnose(make(m, HAND_KINDS, n_model_layers=4, layers=[0]))
    assert one.per_layer["lock_in"].iloc[0] == pytest.approx(0.75)


@pytest.mark.filterwarnings("error")
def test_one_step_thinking_and_no_question():
    one = diagnose(make(HAND[[0, 1, 3]][:, [0, 1, 3]], ["question", "thinking", "summary"], n_model_layers=4, layers=[0]))
    assert one.per_layer["lock_in"].iloc[0] == pytest.approx(0.75)
    assert one.per_layer["thinking_self"].iloc[0] == pytest.approx(3.0)
    # No question, first step is thinking: it has no earlier context and is left out of LI.
    m = np.array([[1.0, 0, 0], [1.0, 1.0, 0], [0.5, 0.5, 1.0]])
    d = diagnose(make(m, ["thinking", "thinking", "summary"], n_model_layers=4, layers=[0]))
    assert d.per_layer["lock_in"].iloc[0] == pytest.approx(0.5)
    assert math.isnan(d.per_layer["question_share"].iloc[0]) and "no question" in d.notes["question_share"]
    # A lone thinking step without anything before it: LI undefined.
    lone = diagnose(make([[1.0, 0], [1.0, 1.0]], ["thinking", "summary"], n_model_layers=4, layers=[0]))
    assert math.isnan(lone.li_shallow) and "earlier" in lone.notes["lock_in"]


def test_layer_subset_and_numpy_maps():
    maps = np.stack([HAND * (1 + l) for l in range(3)])
    res = make(maps, HAND_KINDS, layers=[0, 15, 29], n_model_layers=30)
    res.maps = maps  # numpy works too
    d = diagnose(res)
    assert d.layers == [0, 15, 29]
    assert list(d.per_layer["band"]) == ["shallow", "middle", "deep"]
    assert d.n_model_layers == 30 and d.bands == band_layers(30)
    # Unsorted layer order in the result is sorted in the table.
    res2 = make(maps, HAND_KINDS, layers=[29, 0, 15], n_model_layers=30)
    assert diagnose(res2).layers == [0, 15, 29]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda r: setattr(r, "step_kinds", r.step_kinds[:3]), "step_kinds has 3"),
        (lambda r: setattr(r, "step_kinds", ["question", "thinking", "thinking", "answer"]), "step_kinds must"),
        (lambda r: setattr(r, "layers", [0, 1]), "layers has 2"),
        (lambda r: setattr(r, "layers", [9]), "outside"),
        (lambda r: setattr(r, "maps", -r.maps), "non-negative"),
        (lambda r: setattr(r, "maps", r.maps * float("nan")), "NaN"),
        (lambda r: setattr(r, "maps", r.maps[0]), "shape"),
        (lambda r: setattr(r, "n_model_layers", None), "n_model_layers"),
    ],
)
def test_bad_input_raises_clear_error(change, match):
    res = make(HAND, HAND_KINDS, n_model_layers=4, layers=[0])
    change(res)
    with pytest.raises(StepflowError, match=match):
        diagnose(res)


def test_not_a_result():
    with pytest.raises(StepflowError, match="StepSaliency-like"):
        diagnose(object())


# ----------------------------------------------------------------- outputs


def test_summary_dataframe_and_show(capsys):
    res = make(np.stack([HAND] * 4), HAND_KINDS, meta={"trace_id": "t7", "correct": True, "extra": [1]})
    d = diagnose(res)
    assert isinstance(d, Diagnostics)
    s = d.summary()
    assert s["li_shallow"] == pytest.approx(0.625) and s["ds_deep"] == pytest.approx(0.375)
    assert math.isnan(s["ds_slope_deep"]) and "2 or more" in d.notes["ds_slope_deep"]  # deep = [3] only
    assert s["trace_id"] == "t7" and s["correct"] is True and "extra" not in s
    assert (s["n_question"], s["n_thinking"], s["n_summary"], s["n_layers"]) == (1, 2, 1, 4)
    assert "trace_id" not in d.summary(include_meta=False)
    df = d.to_dataframe()
    assert list(df.columns) == ["layer", "band", *METRICS] and len(df) == 4
    df.loc[0, "lock_in"] = -1
    assert d.per_layer.loc[0, "lock_in"] == pytest.approx(0.625)  # a copy
    bm = d.band_means()
    assert list(bm.index) == list(BANDS) and bm.loc["middle", "lock_in"] == pytest.approx(0.625)
    d.show()
    out = capsys.readouterr().out
    assert "trace=t7" in out and "lock_in" in out and "0.625" in out and "li_shallow" in out
    assert repr(d) == out.rstrip("\n")


# ----------------------------------------------------------------- compare


def synthetic_group(n_traces, lock, seed, *, n_layers=8, n_think=5):
    """Traces whose thinking rows put weight ``lock`` (plus noise) on the diagonal."""
    rng = np.random.default_rng(seed)
    kinds = ["question"] + ["thinking"] * n_think + ["summary"]
    n = len(kinds)
    out = []
    for t in range(n_traces):
        maps = np.tril(rng.uniform(0.05, 1.0, size=(n_layers, n, n)))
        for i in range(1, n - 1):
            maps[:, i, i] = maps[:, i, : i].sum(axis=-1) * (lock + rng.uniform(0, 0.2, n_layers))
        out.append(make(maps, kinds, meta={"trace_id": f"s{seed}-{t}"}))
    return out


def test_compare_detects_clear_shift_with_right_sign():
    high = synthetic_group(8, lock=4.0, seed=1)
    low = synthetic_group(7, lock=0.5, seed=2)
    df = compare(high, low)
    assert {"n_correct", "n_incorrect", "mean_correct", "mean_incorrect", "p_holm"} <= set(df.columns)
    li = df[(df.level == "layer") & (df.metric == "lock_in")]
    assert list(li["layer"]) == list(range(8))
    assert (li["effect"] == 1.0).all()  # every high trace above every low one
    assert (li["p"] < 0.001).all() and (li["p_holm"] >= li["p"]).all() and (li["p_holm"] < 0.01).all()
    assert (li["mean_correct"] > li["mean_incorrect"]).all()
    assert (li["n_correct"] == 8).all() and (li["n_incorrect"] == 7).all()
    assert list(li["band"]) == ["shallow"] * 2 + ["middle"] * 4 + ["deep"] * 2
    band = df[(df.level == "band") & (df.metric == "lock_in")]
    assert list(band["band"]) == list(BANDS) and band["layer"].isna().all()
    assert (band["effect"] == 1.0).all()
    slope = df[df.metric == "ds_slope"]
    assert len(slope) == 1 and slope["band"].iloc[0] == "deep"
    # Reversed groups flip the sign.
    rev = compare(low, high, labels=("a", "b"), metrics=["lock_in"])
    assert (rev[rev.metric == "lock_in"]["effect"] == -1.0).all() and "n_a" in rev.columns


def test_compare_welch_holm_families_and_mixed_inputs():
    high = synthetic_group(6, lock=3.0, seed=3)
    low = [diagnose(r) for r in synthetic_group(6, lock=0.3, seed=4)]
    df = compare(high, low, test="welch", metrics=["lock_in", "question_share"])
    li = df[(df.level == "layer") & (df.metric == "lock_in")]
    assert (li["effect_name"] == "hedges_g").all() and (li["effect"] > 2).all() and (li["p"] < 1e-3).all()
    # Holm runs per (level, metric): recompute one family by hand.
    from stepflow_tl.stats import holm

    qt = df[(df.level == "layer") & (df.metric == "question_share")]
    np.testing.assert_allclose(qt["p_holm"], holm(qt["p"].to_numpy()))


def test_compare_nan_metrics_and_small_groups():
    no_summary = [make(np.stack([HAND[:3, :3]] * 4), HAND_KINDS[:3]) for _ in range(3)]
    with_summary = [make(np.stack([HAND * (1 + 0.1 * k)] * 4), HAND_KINDS) for k in range(3)]
    df = compare(no_summary, with_summary, metrics=["summary_thinking_share"])
    ds = df[df.metric == "summary_thinking_share"]
    assert ds["p"].isna().all() and (ds["n_correct"] == 0).all()
    assert ds["reason"].str.contains("at least 2").all()
    one = compare(with_summary[:1], with_summary[1:], metrics=["lock_in"])
    assert one[one.metric == "lock_in"]["p"].isna().all()
    empty = compare([], with_summary, metrics=["lock_in"])
    assert (empty["n_correct"] == 0).all()


def test_compare_rejects_bad_input():
    g = synthetic_group(2, lock=1.0, seed=5)
    other_model = synthetic_group(2, lock=1.0, seed=6, n_layers=4)
    with pytest.raises(StepflowError, match="same model"):
        compare(g, other_model)
    with pytest.raises(StepflowError, match="labels"):
        compare(g, g, labels=("x", "x"))
    with pytest.raises(StepflowError, match="metrics"):
        compare(g, g, metrics=["nope"])
    with pytest.raises(StepflowError, match="empty"):
        compare([], [])
    with pytest.raises(StepflowError, match="list"):
        compare(g[0], g)
