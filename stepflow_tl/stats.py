"""Statistics for paired StepFlow studies and correct-vs-incorrect comparisons.

Everything here works on plain 1-D arrays (lists, numpy arrays, 1-D tensors) and
returns small frozen dataclasses. Random choices take an explicit ``seed``.

Functions:

- :func:`paired_bootstrap_ci` -- mean paired difference ``mean(b - a)`` with a
  percentile bootstrap interval (resampling problems, keeping pairs together).
- :func:`mcnemar_exact` -- exact McNemar test for paired 0/1 outcomes
  (``scipy.stats.binomtest`` on the discordant pairs).
- :func:`compare_groups` -- two independent groups: Mann-Whitney U with Cliff's
  delta, or Welch's t with Hedges' g.
- :func:`bootstrap_mean_ci` -- the mean of one sample with a percentile bootstrap interval.
- :func:`wilcoxon_signed_rank` -- Wilcoxon signed-rank test of paired differences.
- :func:`spearman` -- Spearman rank correlation (Pearson of average ranks).
- :func:`holm` -- Holm step-down adjustment of a family of p-values.
- :func:`wilson_interval` -- Wilson score interval for an accuracy ``k / n``.

See docs/statistics.md for the study design these serve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from .errors import StepflowError

__all__ = [
    "BootstrapCI",
    "McNemarResult",
    "GroupComparison",
    "Proportion",
    "paired_bootstrap_ci",
    "bootstrap_mean_ci",
    "wilcoxon_signed_rank",
    "spearman",
    "mcnemar_exact",
    "compare_groups",
    "holm",
    "wilson_interval",
]

# Resampled index matrices are built in chunks of at most this many entries so a
# large study (many problems x 10,000 resamples) never needs gigabytes at once.
_MAX_CHUNK_ENTRIES = 4_000_000


def _as_1d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StepflowError(f"{name}: expected a 1-D array of numbers, got {type(x).__name__}") from exc
    if arr.ndim != 1:
        raise StepflowError(f"{name}: expected a 1-D array, got shape {tuple(arr.shape)}")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    if a.shape != b.shape:
        raise StepflowError(
            f"paired arrays must be aligned (same problems, same order): got lengths {a.size} and {b.size}"
        )
    if a.size == 0:
        raise StepflowError("paired arrays are empty; expected at least one problem")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StepflowError("paired arrays contain NaN or inf; drop those problems from both arrays first")
    return a, b


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise StepflowError(f"level must be in (0, 1), e.g. 0.95; got {level}")


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """A mean (for `paired_bootstrap_ci`: the mean paired difference ``mean(b - a)``) and
    its percentile bootstrap interval."""

    diff: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean_ci(x: ArrayLike, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap interval for ``mean(x)``: ``x`` resampled with replacement
    ``n_boot`` times with ``numpy.random.default_rng(seed)``; the interval is the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles of the resampled means (``diff`` holds
    the mean). The one bootstrap of this package; `paired_bootstrap_ci` applies it to
    the paired differences."""
    x = _as_1d(x, "x")
    if x.size == 0 or not np.isfinite(x).all():
        raise StepflowError("bootstrap_mean_ci needs at least one value and only finite ones")
    _check_level(level)
    if int(n_boot) < 100:
        raise StepflowError(f"n_boot must be at least 100 for a usable interval; got {n_boot}")
    n_boot = int(n_boot)
    n = x.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, _MAX_CHUNK_ENTRIES // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapCI(
        diff=float(x.mean()), low=float(low), high=float(high), level=level, n=n, n_boot=n_boot, seed=seed
    )


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> BootstrapCI:
    """Percentile bootstrap interval for the mean paired difference ``mean(b - a)``.

    ``a`` and ``b`` are aligned per problem (e.g. 0/1 correctness of the baseline
    and of StepFlow on the same problems with the same sampling seed). Problems are
    resampled with replacement, pairs kept together, ``n_boot`` times using
    ``numpy.random.default_rng(seed)``; the interval is the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles of the resampled mean differences.

    Args:
        a, b: 1-D arrays of equal length ``[n_problems]``.
        n_boot: number of bootstrap resamples (>= 100).
        seed: seed of the resampling generator; same seed, same interval.
        level: coverage of the interval.
    """
    a, b = _paired(a, b)
    return bootstrap_mean_ci(b - a, n_boot=n_boot, seed=seed, level=level)


# --------------------------------------------------------------------------- Wilcoxon, Spearman


def wilcoxon_signed_rank(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided Wilcoxon signed-rank p of the paired differences ``b - a``
    (``scipy.stats.wilcoxon``, zero differences dropped as in Wilcoxon's original
    test, scipy's ``method="auto"``: exact for small n without ties). NaN when every
    difference is zero (no evidence either way, and scipy's test is undefined)."""
    a, b = _paired(a, b)
    d = b - a
    if not np.any(d != 0):
        return math.nan
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rho of ``x`` and ``y`` ``[n]``: the Pearson correlation of their
    average ranks (ties share the mean rank). NaN with fewer than 3 pairs or when
    either side is constant (no ranking to correlate)."""
    x, y = _paired(x, y)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx = stats.rankdata(x) - (x.size + 1) / 2.0
    ry = stats.rankdata(y) - (y.size + 1) / 2.0
    return float(np.clip((rx @ ry) / math.sqrt((rx @ rx) * (ry @ ry)), -1.0, 1.0))


# --------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test. ``b01``: problems wrong in ``a`` and right in ``b``;
    ``b10``: right in ``a`` and wrong in ``b``; ``p``: two-sided exact p-value."""

    b01: int
    b10: int
    n: int
    p: float

    @property
    def n_discordant(self) -> int:
        return self.b01 + self.b10

    def to_dict(self) -> dict:
        return {**asdict(self), "n_discordant": self.n_discordant}


def mcnemar_exact(a: ArrayLike, b: ArrayLike) -> McNemarResult:
    """Exact McNemar test for paired binary outcomes ``a``, ``b`` (0/1 per problem).

    Under H0 each discordant pair is equally likely to go either way, so ``b01`` is
    Binomial(b01 + b10, 1/2); the p-value is ``scipy.stats.binomtest(b01, b01 + b10,
    0.5).pvalue`` (two-sided). With no discordant pairs the data carry no evidence
    either way and ``p = 1``.
    """
    a, b = _paired(a, b)
    for name, arr in (("a", a), ("b", b)):
        if not np.isin(arr, (0.0, 1.0)).all():
            raise StepflowError(f"mcnemar_exact: {name} must hold only 0/1 (or False/True) outcomes")
    b01 = int(np.sum((a == 0) & (b == 1)))
    b10 = int(np.sum((a == 1) & (b == 0)))
    n_disc = b01 + b10
    p = 1.0 if n_disc == 0 else float(stats.binomtest(b01, n_disc, 0.5).pvalue)
    return McNemarResult(b01=b01, b10=b10, n=int(a.size), p=p)


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class GroupComparison:
    """Two independent groups ``x`` and ``y``.

    ``effect`` is Cliff's delta (Mann-Whitney) or Hedges' g (Welch); positive means
    ``x`` tends to be larger. ``p`` is NaN when the test is undefined and ``reason``
    then says why (empty string otherwise).
    """

    test: str
    effect_name: str
    effect: float
    statistic: float
    p: float
    n_x: int
    n_y: int
    mean_x: float
    mean_y: float
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_TESTS = {"mannwhitney": "cliffs_delta", "welch": "hedges_g"}


def _hedges_g(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = x.size, y.size
    df = nx + ny - 2
    pooled = ((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / df
    if pooled <= 0.0:
        return math.nan
    d = (x.mean() - y.mean()) / math.sqrt(pooled)
    # Exact small-sample correction J(df) = Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)),
    # via log-gamma so large df do not overflow.
    j = math.exp(special.gammaln(df / 2.0) - special.gammaln((df - 1) / 2.0)) / math.sqrt(df / 2.0)
    return float(d * j)


def compare_groups(x: ArrayLike, y: ArrayLike, *, test: str = "mannwhitney") -> GroupComparison:
    """Compare two independent samples (e.g. a metric on correct vs incorrect traces).

    NaN/inf values are dropped first (a trace without a summary has no DS), and the
    ``n_x``/``n_y`` reported are the counts actually used.

    - ``test="mannwhitney"``: ``scipy.stats.mannwhitneyu(x, y, alternative="two-sided")``
      (scipy's ``method="auto"``: exact without ties for small samples, else normal
      approximation with tie correction); statistic = U of ``x``; effect = Cliff's
      delta = P(X > Y) - P(X < Y) = 2 U / (n_x n_y) - 1, in [-1, 1].
    - ``test="welch"``: ``scipy.stats.ttest_ind(x, y, equal_var=False)``; effect =
      Hedges' g (pooled-SD standardised mean difference times the exact
      small-sample correction).

    Undefined cases return NaN p (and NaN statistic) with ``reason`` set instead of
    raising: fewer than 2 values in a group, all values identical (Mann-Whitney), or
    zero variance in both groups (Welch).
    """
    if test not in _TESTS:
        raise StepflowError(f"test must be one of {sorted(_TESTS)}; got {test!r}")
    x = _as_1d(x, "x")
    y = _as_1d(y, "y")
    x = x[np.isfinite(x)]
    y = y[np.isfinite(y)]
    nx, ny = int(x.size), int(y.size)
    mean_x = float(x.mean()) if nx else math.nan
    mean_y = float(y.mean()) if ny else math.nan
    base = dict(test=test, effect_name=_TESTS[test], n_x=nx, n_y=ny, mean_x=mean_x, mean_y=mean_y)
    nan = math.nan

    if nx < 2 or ny < 2:
        return GroupComparison(
            **base, effect=nan, statistic=nan, p=nan,
            reason=f"need at least 2 finite values per group; got {nx} and {ny}",
        )

    if test == "mannwhitney":
        if np.ptp(np.concatenate([x, y])) == 0.0:
            return GroupComparison(
                **base, effect=0.0, statistic=nan, p=nan,
                reason="all values are identical; the rank test is undefined",
            )
        res = stats.mannwhitneyu(x, y, alternative="two-sided")
        u = float(res.statistic)
        return GroupComparison(**base, effect=2.0 * u / (nx * ny) - 1.0, statistic=u, p=float(res.pvalue))

    if np.ptp(x) == 0.0 and np.ptp(y) == 0.0:
        return GroupComparison(
            **base, effect=nan, statistic=nan, p=nan,
            reason="both groups have zero variance; Welch's t is undefined",
        )
    res = stats.ttest_ind(x, y, equal_var=False)
    return GroupComparison(**base, effect=_hedges_g(x, y), statistic=float(res.statistic), p=float(res.pvalue))


# --------------------------------------------------------------------------- Holm


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, ``p_adj(k) = max_{i<=k} min(1,
    (m - i + 1) p(i))``. NaN entries (tests that could not be run) stay NaN and do
    not count towards m. Reject at level alpha where ``p_adj <= alpha``; this
    controls the family-wise error rate.

    Args:
        pvalues: 1-D array ``[n_tests]`` of p-values in [0, 1] or NaN.
    Returns:
        float64 array ``[n_tests]``.
    """
    p = _as_1d(pvalues, "pvalues")
    out = np.full(p.shape, np.nan)
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise StepflowError("holm: p-values must lie in [0, 1] (or be NaN)")
    idx = np.flatnonzero(finite)
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


# --------------------------------------------------------------------------- Wilson


@dataclass(frozen=True)
class Proportion:
    """An accuracy ``k / n`` with its Wilson score interval."""

    k: int
    n: int
    estimate: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(k: int, n: int, *, level: float = 0.95) -> Proportion:
    """Wilson score interval for a binomial proportion ``k / n``.

    ``(k + z^2/2) / (n + z^2)  +-  z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)``
    with ``z = scipy.stats.norm.ppf((1 + level) / 2)``; identical to
    ``scipy.stats.binomtest(k, n).proportion_ci(level, method="wilson")``. Unlike
    the Wald interval it stays inside [0, 1] and is sensible at 0/n and n/n.
    """
    _check_level(level)
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise StepflowError(f"wilson_interval: k and n must be integers; got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise StepflowError(f"wilson_interval: expected 0 <= k <= n and n >= 1; got k={k}, n={n}")
    z = float(stats.norm.ppf((1.0 + level) / 2.0))
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    # At k = 0 (k = n) the lower (upper) bound is 0 (1) exactly; in floating point
    # centre - half can come out as 1e-17, an interval that misses its own estimate.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Proportion(k=k, n=n, estimate=k / n, low=low, high=high, level=level)
