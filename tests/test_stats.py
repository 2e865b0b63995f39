import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from stepflow_tl.errors import StepflowError
from stepflow_tl.stats import compare_groups, holm, mcnemar_exact, paired_bootstrap_ci, wilson_interval

# ----------------------------------------------------------------- bootstrap


def test_bootstrap_diff_and_reproducible():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200)
    b = np.where(rng.random(200) < 0.15, 1, a)  # b fixes some of a's errors
    r1 = paired_bootstrap_ci(a, b, n_boot=2000, seed=7)
    r2 = paired_bootstrap_ci(a, b, n_boot=2000, seed=7)
    r3 = paired_bootstrap_ci(a, b, n_boot=2000, seed=8)
    assert r1 == r2
    assert (r1.low, r1.high) != (r3.low, r3.high)
    assert r1.diff == pytest.approx(float(np.mean(b - a)))
    assert r1.low <= r1.diff <= r1.high
    assert r1.n == 200 and r1.n_boot == 2000 and r1.seed == 7


def test_bootstrap_matches_scipy_percentile_and_normal_theory():
    rng = np.random.default_rng(3)
    a = rng.normal(size=400)
    b = a + 0.3 + rng.normal(scale=1.0, size=400)
    ours = paired_bootstrap_ci(a, b, n_boot=10000, seed=0)
    ref = sps.bootstrap(
        (b - a,), np.mean, n_resamples=10000, method="percentile", confidence_level=0.95,
        random_state=np.random.default_rng(123), vectorized=True,
    ).confidence_interval
    # Different resampling streams: agree up to Monte Carlo error.
    assert ours.low == pytest.approx(ref.low, abs=0.02)
    assert ours.high == pytest.approx(ref.high, abs=0.02)
    d = b - a
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert ours.high - ours.low == pytest.approx(2 * 1.96 * se, rel=0.05)


def test_bootstrap_degenerate_and_level():
    a = np.array([1, 0, 1, 1, 0])
    r = paired_bootstrap_ci(a, a, n_boot=500, seed=0)
    assert (r.diff, r.low, r.high) == (0.0, 0.0, 0.0)
    b = np.array([1, 1, 1, 1, 1])
    wide = paired_bootstrap_ci(a, b, n_boot=3000, seed=0, level=0.99)
    narrow = paired_bootstrap_ci(a, b, n_boot=3000, seed=0, level=0.5)
    assert wide.low <= narrow.low <= narrow.high <= wide.high


def test_bootstrap_accepts_tensors_and_chunks(monkeypatch):
    import stepflow_tl.stats as st

    a = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0])
    b = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1])
    full = paired_bootstrap_ci(a, b, n_boot=1000, seed=5)
    monkeypatch.setattr(st, "_MAX_CHUNK_ENTRIES", 40)  # 5 resamples per chunk
    chunked = paired_bootstrap_ci(a, b, n_boot=1000, seed=5)
    assert full == chunked
    assert full.diff == pytest.approx(3 / 8)


@pytest.mark.parametrize(
    "a,b,kw",
    [
        ([0, 1], [0, 1, 1], {}),
        ([], [], {}),
        ([0, 1], [0, float("nan")], {}),
        ([[0, 1]], [[0, 1]], {}),
        ([0, 1], [1, 1], {"level": 1.5}),
        ([0, 1], [1, 1], {"n_boot": 10}),
    ],
)
def test_bootstrap_bad_input(a, b, kw):
    with pytest.raises(StepflowError):
        paired_bootstrap_ci(a, b, **kw)


# ----------------------------------------------------------------- McNemar


def test_mcnemar_textbook_example():
    # Classic 2x2 table (a=59, b=6, c=16, d=80): 6 vs 16 discordant pairs.
    # Exact two-sided p = 2 * sum_{k<=6} C(22, k) / 2^22, computed by hand.
    a = np.array([1] * 59 + [1] * 6 + [0] * 16 + [0] * 80)
    b = np.array([1] * 59 + [0] * 6 + [1] * 16 + [0] * 80)
    r = mcnemar_exact(a, b)
    assert (r.b01, r.b10, r.n, r.n_discordant) == (16, 6, 161, 22)
    expected = 2 * sum(math.comb(22, k) for k in range(7)) / 2**22
    assert r.p == pytest.approx(expected, rel=1e-12)
    assert r.p == pytest.approx(0.052478, abs=1e-6)
    # Swapping the conditions swaps the counts, not the p-value.
    s = mcnemar_exact(b, a)
    assert (s.b01, s.b10) == (6, 16) and s.p == pytest.approx(r.p)


def test_mcnemar_edge_cases():
    same = mcnemar_exact([1, 0, 1], [1, 0, 1])
    assert (same.b01, same.b10, same.p) == (0, 0, 1.0)
    one_sided = mcnemar_exact([0] * 10, [1] * 10)
    assert one_sided.p == pytest.approx(2 / 2**10)
    assert mcnemar_exact([True, False], [False, False]).b10 == 1
    with pytest.raises(StepflowError, match="0/1"):
        mcnemar_exact([0, 2], [0, 1])


# ----------------------------------------------------------------- groups


def test_mannwhitney_cliffs_delta_known_values():
    x = [1, 2, 3]
    y = [4, 5, 6]
    r = compare_groups(x, y)
    assert r.effect_name == "cliffs_delta"
    assert r.effect == -1.0
    assert r.statistic == 0.0
    assert r.p == pytest.approx(sps.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    assert r.p == pytest.approx(0.1)  # exact: 2 / C(6, 3)
    assert compare_groups(y, x).effect == 1.0
    # Hand count with ties: pairs (x>y, x<y) over 2x2 = (x=[1,3], y=[1,2]): >: (3,1),(3,2); <: (1,2) -> 1/4
    assert compare_groups([1, 3], [1, 2]).effect == pytest.approx(0.25)
    assert (r.n_x, r.n_y, r.mean_x, r.mean_y) == (3, 3, 2.0, 5.0)
    assert r.reason == ""


def test_welch_hedges_g_matches_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 12)
    y = rng.normal(0.0, 2.0, 9)
    r = compare_groups(x, y, test="welch")
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert r.statistic == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
    sp = math.sqrt(((11) * x.var(ddof=1) + 8 * y.var(ddof=1)) / 19)
    d = (x.mean() - y.mean()) / sp
    j = math.gamma(19 / 2) / (math.sqrt(19 / 2) * math.gamma(18 / 2))
    assert r.effect == pytest.approx(d * j, rel=1e-12)
    assert j == pytest.approx(1 - 3 / (4 * 19 - 1), abs=1e-3)  # Hedges' approximation
    assert r.effect_name == "hedges_g" and r.effect > 0


def test_compare_groups_clear_shift_gives_small_p():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, 40)
    y = rng.normal(1.5, 1.0, 40)
    for test in ("mannwhitney", "welch"):
        r = compare_groups(x, y, test=test)
        assert r.p < 1e-4 and r.effect < -0.5


def test_compare_groups_undefined_cases_do_not_crash():
    r = compare_groups([1.0], [2.0, 3.0])
    assert math.isnan(r.p) and "at least 2" in r.reason and r.n_x == 1
    r = compare_groups([0.5, 0.5, 0.5], [0.5, 0.5])
    assert math.isnan(r.p) and r.effect == 0.0 and "identical" in r.reason
    r = compare_groups([1.0, 1.0], [2.0, 2.0], test="welch")
    assert math.isnan(r.p) and math.isnan(r.effect) and "zero variance" in r.reason
    # Constant within groups but different: the rank test is fine.
    r = compare_groups([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert r.effect == -1.0 and 0 < r.p < 1
    # NaN values are dropped and the counts say so.
    r = compare_groups([1.0, float("nan"), 2.0, 3.0], [4.0, 5.0, float("nan")])
    assert (r.n_x, r.n_y) == (3, 2) and r.effect == -1.0
    r = compare_groups([], [])
    assert math.isnan(r.mean_x) and math.isnan(r.p)
    with pytest.raises(StepflowError, match="test must be"):
        compare_groups([1, 2], [3, 4], test="ttest")


# ----------------------------------------------------------------- Holm


def test_holm_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])


def test_holm_nan_clip_and_properties():
    out = holm([0.5, float("nan"), 0.4])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.8, 0.8])  # m=2: 0.4*2=0.8, max(0.8, 0.5)=0.8
    np.testing.assert_allclose(holm([0.9, 0.6]), [1.0, 1.0])
    assert holm([]).size == 0
    rng = np.random.default_rng(4)
    p = rng.random(20)
    adj = holm(p)
    assert np.all(adj >= p) and np.all(adj <= 1)
    assert np.all(np.diff(adj[np.argsort(p)]) >= 0)
    with pytest.raises(StepflowError):
        holm([0.1, 1.2])


# ----------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (7, 20), (431, 500), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ours = wilson_interval(k, n)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert ours.low == pytest.approx(ref.low, abs=1e-12)
    assert ours.high == pytest.approx(ref.high, abs=1e-12)
    assert ours.estimate == k / n
    assert 0.0 <= ours.low <= ours.estimate <= ours.high <= 1.0


def test_wilson_hand_value_and_errors():
    # 8/10, z=1.959964: centre=(8+1.92073)/(13.84146)=0.716749, half=0.2458... -> [0.4902, 0.9433]
    r = wilson_interval(8, 10)
    assert r.low == pytest.approx(0.4902, abs=1e-4) and r.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(8, 10, level=0.99).low < r.low
    for k, n in [(-1, 5), (6, 5), (0, 0), (1.5, 3)]:
        with pytest.raises(StepflowError):
            wilson_interval(k, n)


def test_wilson_interval_contains_its_estimate_at_zero_and_all():
    # In floating point centre - half came out as ~1e-17 at k = 0, an interval above
    # its own estimate that later stopped the report of a resumed study.
    for n in range(1, 300):
        for k in (0, n):
            r = wilson_interval(k, n)
            assert r.low <= r.estimate <= r.high
        assert wilson_interval(0, n).low == 0.0 and wilson_interval(n, n).high == 1.0
