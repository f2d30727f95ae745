"""The statistics module against scipy called directly, hand computations and the noncentral
t distribution."""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pytest
from scipy import optimize, stats

from benchmark.report.statistics import (
    N_RESAMPLES,
    RNG_SEED,
    balanced_accuracy,
    bootstrap_ci,
    bootstrap_diff_ci,
    compare,
    confusion_matrices,
    hierarchical_ci,
    holm,
    macro_f1,
    paired_power,
    two_sample_power,
)
from tests.benchmark.report._store import welch_by_hand


def _scipy_ci(*samples, statistic) -> tuple[float, float]:
    res = stats.bootstrap(
        samples,
        statistic,
        n_resamples=N_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(RNG_SEED),
    )
    return res.confidence_interval.low, res.confidence_interval.high


def test_bootstrap_ci_is_scipys_percentile_interval():
    x = [56.0, 57.0, 58.0, 61.0]
    ci = bootstrap_ci(x)
    low, high = _scipy_ci(np.array(x), statistic=np.mean)
    assert (ci.estimate, ci.low, ci.high) == (pytest.approx(58.0), low, high)
    assert 56.0 <= ci.low < 58.0 < ci.high <= 61.0


def test_bootstrap_ci_degenerate_and_single_values_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning spam
        same = bootstrap_ci([3.0, 3.0, 3.0])
        one = bootstrap_ci([2.5])
        diff_one = bootstrap_diff_ci([1.0], [2.0, 3.0])
    assert (same.estimate, same.low, same.high) == (3.0, 3.0, 3.0)
    assert one.estimate == 2.5 and math.isnan(one.low) and math.isnan(one.high)
    assert diff_one.estimate == pytest.approx(-1.5) and math.isnan(diff_one.low)


def test_bootstrap_diff_ci_is_scipys_two_sample_interval():
    a, b = np.array([53.0, 55.0, 54.0]), np.array([50.0, 52.0])
    ci = bootstrap_diff_ci(a, b)
    low, high = _scipy_ci(a, b, statistic=lambda u, v: np.mean(u) - np.mean(v))
    assert ci.estimate == pytest.approx(54.0 - 51.0)
    assert (ci.low, ci.high) == (pytest.approx(low), pytest.approx(high))


def test_paired_comparison_against_hand_t():
    a = {1: 56.0, 2: 57.0, 3: 58.0, 4: 61.0}  # seed 4 has no partner
    b = {1: 50.0, 2: 52.0, 3: 54.0}
    c = compare(a, b)
    d = [6.0, 5.0, 4.0]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))  # 5 / (1 / √3)
    assert c.test == "paired" and c.pairs == 3
    assert c.delta == pytest.approx(5.0)
    assert c.t == pytest.approx(t) and c.p == pytest.approx(2 * stats.t.sf(t, df=2))
    low, high = _scipy_ci(np.array(d), statistic=np.mean)
    assert (c.low, c.high) == (pytest.approx(low), pytest.approx(high))
    assert c.resolved is True


def test_unpaired_seeds_fall_back_to_welch_and_one_seed_to_no_test():
    a, b = {1: 53.0, 2: 55.0, 5: 58.0}, {3: 50.0, 4: 52.0, 6: 51.0}
    c = compare(a, b)
    t, p = welch_by_hand([53, 55, 58], [50, 52, 51])
    assert c.test == "welch" and c.pairs == 0
    assert (c.t, c.p) == (pytest.approx(t), pytest.approx(p))
    assert c.delta == pytest.approx(statistics.fmean([53, 55, 58]) - 51.0)
    x, y = np.array([53.0, 55, 58]), np.array([50.0, 52, 51])
    low, high = _scipy_ci(x, y, statistic=lambda u, v: u.mean() - v.mean())
    assert (c.low, c.high) == (pytest.approx(low), pytest.approx(high))
    # one shared seed is not a pairing; one seed on a side is no test and no interval
    one = compare({1: 53.0}, {1: 50.0, 2: 52.0, 3: 54.0})
    assert one.test is None and math.isnan(one.p) and one.resolved is None
    assert one.delta == pytest.approx(1.0)
    # ... but the baseline's spread still says what more seeds would detect
    assert math.isfinite(one.mdd) and one.seeds_needed >= 2


def test_interval_covering_zero_is_not_resolved():
    c = compare({1: 50.0, 2: 53.0, 3: 51.0}, {1: 51.0, 2: 51.0, 3: 52.0})  # d = -1, 2, -1
    assert c.low < 0 < c.high and c.resolved is False


def test_holm_against_hand_worked_example():
    # sorted 0.01, 0.03, 0.04 → 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # no test (NaN) is not a member of the family
    out = holm([0.01, math.nan, 0.04])
    assert out[[0, 2]] == pytest.approx([0.02, 0.04]) and math.isnan(out[1])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def _power(d: float, df: int, nc_per_d: float) -> float:
    crit = stats.t.ppf(0.975, df)
    nc = d * nc_per_d
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def test_mdd_and_seeds_needed_against_the_noncentral_t():
    sd, n = 2.0, 4
    mdd, needed = paired_power(sd, n, target=1.0)
    d = optimize.brentq(lambda e: _power(e, n - 1, math.sqrt(n)) - 0.8, 0.1, 4)
    assert mdd == pytest.approx(d * sd, rel=1e-4)
    # Δ = 1 at sd 2 is d = 0.5: the first n with power ≥ 0.8
    first = next(m for m in range(2, 1000) if _power(0.5, m - 1, math.sqrt(m)) >= 0.8)
    assert needed == first
    # two samples: nc = d √(n₁n₂/(n₁+n₂)), df = n₁ + n₂ − 2; seeds per row at ratio 1
    mdd2, needed2 = two_sample_power(sd, 3, 5, target=1.0)
    d2 = optimize.brentq(lambda e: _power(e, 6, math.sqrt(15 / 8)) - 0.8, 0.1, 4)
    assert mdd2 == pytest.approx(d2 * sd, rel=1e-4)
    first2 = next(m for m in range(2, 1000) if _power(0.5, 2 * m - 2, math.sqrt(m / 2)) >= 0.8)
    assert needed2 == first2
    # a huge effect still needs the two seeds of a test; zero spread detects anything
    assert paired_power(0.01, 3, target=1.0)[1] == 2
    assert paired_power(0.0, 3, target=1.0) == (0.0, 2.0)
    assert all(math.isnan(v) for v in paired_power(1.0, 1, target=1.0))


def test_vectorised_balanced_accuracy_and_macro_f1_by_hand():
    labels = np.array([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 0]])
    preds = np.array([[0, 0, 1, 1, 2, 2], [0, 2, 1, 1, 0, 0]])
    cm = confusion_matrices(labels, preds, 3)
    assert cm[0].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # sample 0: recalls 2/3, 1/2, 1; F1 = 2TP/(2TP+FP+FN) = 4/5, 2/4, 2/3
    # sample 1: class 2 only predicted, not a class of either mean (recalls 3/4, 1)
    assert balanced_accuracy(cm) == pytest.approx(
        [100 * (2 / 3 + 1 / 2 + 1) / 3, 100 * (3 / 4 + 1) / 2]
    )
    assert macro_f1(cm) == pytest.approx([100 * (4 / 5 + 2 / 4 + 2 / 3) / 3, 100 * (6 / 7 + 1) / 2])


def test_hierarchical_ci_estimate_and_width_match_the_two_level_variance():
    rng = np.random.default_rng(7)
    per_seed = [rng.normal(mu, 8.0, size=60) for mu in (70.0, 74.0, 71.0, 76.0)]
    ci = hierarchical_ci(per_seed, n_resamples=4000)
    means = np.array([x.mean() for x in per_seed])
    assert ci.estimate == pytest.approx(means.mean())
    # the resampled mean's variance: (seed spread + mean image variance / n) / S, with
    # population (ddof 0) variances as the bootstrap draws them
    within = np.mean([x.var() / len(x) for x in per_seed])
    sd = math.sqrt((means.var() + within) / len(per_seed))
    assert ci.high - ci.low == pytest.approx(2 * 1.959964 * sd, rel=0.12)
    assert ci.low < ci.estimate < ci.high


def test_hierarchical_ci_of_a_classifier():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = hierarchical_ci([(labels, labels)] * 3, "balanced_accuracy", n_resamples=200)
    assert (perfect.estimate, perfect.low, perfect.high) == (100.0, 100.0, 100.0)
    wrong = (labels, np.array([0, 1, 1, 1, 2, 0]))  # recalls 1/2, 1, 1/2
    ci = hierarchical_ci([(labels, labels), wrong], "balanced_accuracy", n_resamples=500)
    assert ci.estimate == pytest.approx((100 + 100 * 2 / 3) / 2)
    assert ci.low < ci.estimate <= ci.high <= 100
    f1 = hierarchical_ci([wrong], "macro_f1", n_resamples=200)
    assert f1.estimate == pytest.approx(100 * (1 / 2 + 4 / 5 + 2 / 3) / 3)
