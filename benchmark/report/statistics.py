"""The report's inference: bootstrap intervals, tests against a baseline, Holm, power.

Pure numpy / scipy / statsmodels (no MLflow, no pandas), so every number can be checked
against a hand computation. The choices, once, for every function below:

* **Percentile bootstrap**, not BCa. BCa's acceleration is a jackknife over the seeds; with the
  3–5 seeds a benchmark has, that estimate is itself noise, and scipy's BCa turns NaN (with a
  warning) on the near-degenerate resample distributions few seeds give. The percentile
  interval always lies inside the observed range, and it is the one interval the two-level
  (seeds × test images) bootstrap can also use, so every interval of the report is the same
  kind. Its known weakness: with few seeds it is too narrow (it ignores the t distribution's
  heavy tails), so with n ≤ 5 read it together with the t-test's p.
* **Fixed RNG seed** (``RNG_SEED``): a report rebuilt from the same store gives the same digits.
* α = 0.05 two-sided and power 0.8 for the minimum detectable difference and seeds needed.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.tools.sm_exceptions import ConvergenceWarning

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
RNG_SEED = 0
#: Resamples of the bootstrap over seeds (cheap: a handful of values).
N_RESAMPLES = 9999
#: Resamples of the two-level bootstrap (each one redraws every test image of every seed).
N_HIERARCHICAL = 2000
#: Seeds-needed answers beyond this are reported as this bound (the solver's range).
MAX_SEEDS = 100_000
#: The tests ``compare`` can run.
PAIRED, WELCH = "paired", "welch"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its ``CONFIDENCE`` interval (NaN bounds: no interval)."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """One row against the baseline on one dataset and metric.

    ``test`` is ``"paired"`` (same fine-tuning seed numbers on both rows, ≥ 2 pairs) or
    ``"welch"``; ``None`` when neither could run (a side with one seed). ``pairs`` is the
    number of paired seeds (0 for Welch); ``mdd`` the difference this design detects with
    power 0.8, ``seeds_needed`` the seeds per row that would resolve ``target``.
    """

    delta: float
    low: float
    high: float
    test: str | None
    t: float
    p: float
    pairs: int
    mdd: float
    seeds_needed: float

    @property
    def resolved(self) -> bool | None:
        """The interval excludes 0; ``None`` when there is no interval."""
        if math.isnan(self.low) or math.isnan(self.high):
            return None
        return bool(self.low > 0 or self.high < 0)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings of degenerate inputs (zero spread, a solver that gives up): the
    callers check for those cases themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[~np.isnan(x)]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = RNG_SEED,
) -> Interval:
    """Percentile bootstrap interval of the mean over seeds (``scipy.stats.bootstrap``).

    One value has no spread to resample: NaN bounds. Identical values give the degenerate
    interval [value, value] without calling scipy (which would warn)."""
    x = _clean(values)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, math.nan, math.nan)
    if np.ptp(x) == 0:
        return Interval(mean, mean, mean)
    res = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high))


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """What a parent run carries of one metric over its seeds: ``mean``, sample ``std`` (0 for
    one seed) and, from two seeds on, ``ci_low``/``ci_high`` of ``bootstrap_ci`` (the
    report's interval, so the UI's charts and the report agree)."""
    x = [float(v) for v in values]  # fmean / stdev: the digits the aggregates had before
    out = {"mean": statistics.fmean(x), "std": statistics.stdev(x) if len(x) > 1 else 0.0}
    ci = bootstrap_ci(x)
    if not math.isnan(ci.low):
        out.update(ci_low=ci.low, ci_high=ci.high)
    return out


def bootstrap_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = RNG_SEED,
) -> Interval:
    """Percentile interval of mean(a) − mean(b), the two sides resampled independently;
    NaN bounds when a side has one value (its spread is unknown, not zero)."""
    x, y = _clean(a), _clean(b)
    if not len(x) or not len(y):
        return Interval(math.nan, math.nan, math.nan)
    delta = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Interval(delta, math.nan, math.nan)
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return Interval(delta, delta, delta)
    res = stats.bootstrap(
        (x, y),
        lambda u, v, axis: u.mean(axis=axis) - v.mean(axis=axis),
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return Interval(delta, float(res.confidence_interval.low), float(res.confidence_interval.high))


# ---------------------------------------------------------------- classification metrics


def confusion_matrices(labels: np.ndarray, predictions: np.ndarray, k: int) -> np.ndarray:
    """``(..., k, k)`` confusion matrices (rows = true class) of the last axis of ``labels``
    and ``predictions``, in one ``bincount``: the resamples of the bootstrap at once."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    lead = labels.shape[:-1]
    rows = int(np.prod(lead, dtype=int))
    code = labels.reshape(rows, -1) * k + predictions.reshape(rows, -1)
    code = code + (np.arange(rows) * k * k)[:, None]
    counts = np.bincount(code.ravel(), minlength=rows * k * k)
    return counts.reshape(*lead, k, k)


def balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes that occur in the labels (sklearn's definition), in %."""
    support = cm.sum(axis=-1)
    recall = np.diagonal(cm, axis1=-2, axis2=-1) / np.where(support > 0, support, 1)
    present = support > 0
    return 100 * (recall * present).sum(axis=-1) / present.sum(axis=-1)


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 = 2 TP / (2 TP + FP + FN) over the classes that occur in the labels, in %: the
    probe stage's definition (sklearn ``f1_score(labels=present, average="macro")``), so the
    bootstrap resamples the very number the probe child logged."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(axis=-1) + cm.sum(axis=-2)  # 2 TP + FN + FP
    present = cm.sum(axis=-1) > 0
    f1 = 2 * tp / np.where(denom > 0, denom, 1)
    return 100 * (f1 * present).sum(axis=-1) / present.sum(axis=-1)


CLASSIFICATION = {"balanced_accuracy": balanced_accuracy, "macro_f1": macro_f1}


# ---------------------------------------------------------------- two-level bootstrap

#: One seed's test set: per-image values, or (labels, predictions) for a classifier.
SeedData = np.ndarray | tuple[np.ndarray, np.ndarray]


def _resampler(
    data: SeedData, statistic: str, k: int
) -> tuple[float, Callable[[np.ndarray], np.ndarray]]:
    """The seed's statistic on its full test set, and the statistic of image resamples
    ``idx`` (shape ``(r, n)``), vectorised over the ``r`` rows."""
    if statistic == "mean":
        values = np.asarray(data, dtype=float)
        return float(values.mean()), lambda idx: values[idx].mean(axis=-1)
    labels, predictions = (np.asarray(a, dtype=np.int64) for a in data)
    metric = CLASSIFICATION[statistic]
    full = float(metric(confusion_matrices(labels, predictions, k)))
    return full, lambda idx: metric(confusion_matrices(labels[idx], predictions[idx], k))


def hierarchical_ci(
    per_seed: Sequence[SeedData],
    statistic: str = "mean",
    n_resamples: int = N_HIERARCHICAL,
    confidence: float = CONFIDENCE,
    seed: int = RNG_SEED,
    chunk: int = 4_000_000,
) -> Interval:
    """Two-level percentile bootstrap over seeds and test images.

    Each resample draws the seeds with replacement, then for every drawn seed its test images
    with replacement, and averages the per-seed statistics: ``"mean"`` of per-image values
    (dense Dice / IoU), or ``"balanced_accuracy"`` / ``"macro_f1"`` recomputed from the
    resampled (labels, predictions) of a classifier. A seed drawn twice gets two independent
    image resamples. The estimate is the mean over seeds of each seed's statistic on its
    whole test set. One seed: the interval covers test-image sampling only. ``chunk`` bounds
    the number of image indices drawn at once (memory)."""
    if not per_seed:
        return Interval(math.nan, math.nan, math.nan)
    k = 1
    if statistic != "mean":
        k = 1 + max(int(max(np.max(y, initial=0), np.max(p, initial=0))) for y, p in per_seed)
    pairs = [_resampler(d, statistic, k) for d in per_seed]
    sizes = [len(d) if statistic == "mean" else len(d[0]) for d in per_seed]
    estimate = float(np.mean([full for full, _ in pairs]))
    rng = np.random.default_rng(seed)
    n_seeds = len(per_seed)
    picks = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    draws = np.empty(picks.shape, dtype=float)
    for s, ((_, resample), n) in enumerate(zip(pairs, sizes, strict=True)):
        slots = np.flatnonzero(picks.ravel() == s)
        step = max(1, chunk // max(n, 1))
        for start in range(0, len(slots), step):
            part = slots[start : start + step]
            idx = rng.integers(0, n, size=(len(part), n))
            draws.flat[part] = resample(idx)
    means = draws.mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high))


# ---------------------------------------------------------------- power


def _seeds_for(power_of: Callable[[np.ndarray], np.ndarray], solved: float) -> float:
    """The smallest integer number of seeds with power ≥ ``POWER``: ``solve_power``'s answer
    rounded up, or (where its root finder fails: tiny or huge effects) a scan of ``power``."""
    if np.isfinite(solved) and solved > 0:
        n = max(2, math.ceil(solved - 1e-9))
        return float(min(n, MAX_SEEDS))
    grid = np.unique(np.geomspace(2, MAX_SEEDS, 400).astype(int))
    with _quiet():
        ok = np.flatnonzero(power_of(grid) >= POWER)
    if not len(ok):
        return float(MAX_SEEDS)
    hi = int(grid[ok[0]])
    lo = int(grid[ok[0] - 1]) if ok[0] else 1
    fine = np.arange(lo + 1, hi + 1)
    with _quiet():
        return float(fine[np.flatnonzero(power_of(fine) >= POWER)[0]])


def paired_power(sd: float, n: int, target: float) -> tuple[float, float]:
    """(minimum detectable difference with ``n`` pairs, pairs needed to detect ``target``)
    for a two-sided paired t-test at ``ALPHA`` with power ``POWER``, the paired differences
    having sample std ``sd``. Zero spread detects any difference: (0, 2)."""
    if n < 2 or not np.isfinite(sd):
        return math.nan, math.nan
    if sd == 0:
        return 0.0, 2.0
    analysis = TTestPower()
    with _quiet():
        d = analysis.solve_power(effect_size=None, nobs=n, alpha=ALPHA, power=POWER)
        solved = analysis.solve_power(
            effect_size=abs(target) / sd, nobs=None, alpha=ALPHA, power=POWER
        )
    needed = _seeds_for(
        lambda m: analysis.power(abs(target) / sd, m, ALPHA), float(np.squeeze(solved))
    )
    return float(np.squeeze(d)) * sd, needed


def two_sample_power(sd: float, n_a: int, n_b: int, target: float) -> tuple[float, float]:
    """As ``paired_power`` for two independent samples (``TTestIndPower``: pooled-variance
    t, the standard approximation to Welch's), ``sd`` the pooled std; seeds needed per row,
    with as many seeds on both rows."""
    if n_a < 1 or n_b < 1 or n_a + n_b < 3 or not np.isfinite(sd):
        return math.nan, math.nan
    if sd == 0:
        return 0.0, 2.0
    analysis = TTestIndPower()
    with _quiet():
        d = analysis.solve_power(
            effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=ALPHA, power=POWER
        )
        solved = analysis.solve_power(
            effect_size=abs(target) / sd, nobs1=None, ratio=1.0, alpha=ALPHA, power=POWER
        )
    needed = _seeds_for(
        lambda m: analysis.power(abs(target) / sd, m, ALPHA, ratio=1.0), float(np.squeeze(solved))
    )
    return float(np.squeeze(d)) * sd, needed


def pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    """√(((n_a − 1) s_a² + (n_b − 1) s_b²) / (n_a + n_b − 2)); a one-seed side adds no spread
    and no degree of freedom (so the baseline's spread stands in for it)."""
    df = len(a) + len(b) - 2
    if df < 1:
        return math.nan
    ss = sum(((x - x.mean()) ** 2).sum() for x in (a, b) if len(x))
    return math.sqrt(ss / df)


# ---------------------------------------------------------------- comparison and Holm


def compare(
    a: Mapping[int, float],
    b: Mapping[int, float],
    target: float = 1.0,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
) -> Comparison:
    """Row ``a`` against baseline ``b``, both ``{fine-tuning seed number: value}``.

    With ≥ 2 seed numbers on both sides the seeds pair (the same seed fixes the same data
    order and head initialisation): Δ is the mean paired difference over those seeds, its
    interval the bootstrap of that mean, the test ``scipy.stats.ttest_rel``. Otherwise Welch
    (``ttest_ind(equal_var=False)``) and the bootstrap of the difference of the means over
    all seeds. ``target`` is the Δ the seeds-needed answer is for."""
    a = {int(k): float(v) for k, v in a.items() if not math.isnan(float(v))}
    b = {int(k): float(v) for k, v in b.items() if not math.isnan(float(v))}
    common = sorted(a.keys() & b.keys())
    if len(common) >= 2:
        diff = np.array([a[s] - b[s] for s in common])
        ci = bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)
        with _quiet(), np.errstate(all="ignore"):
            res = stats.ttest_rel([a[s] for s in common], [b[s] for s in common])
        t, p = float(res.statistic), float(res.pvalue)
        if np.ptp(diff) == 0:  # no spread: the difference is exact (or exactly zero)
            t = math.nan if diff[0] == 0 else math.copysign(math.inf, diff[0])
            p = 1.0 if diff[0] == 0 else 0.0
        mdd, needed = paired_power(float(diff.std(ddof=1)), len(common), target)
        return Comparison(ci.estimate, ci.low, ci.high, PAIRED, t, p, len(common), mdd, needed)
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    if not len(x) or not len(y):
        nan = math.nan
        return Comparison(nan, nan, nan, None, nan, nan, 0, nan, nan)
    ci = bootstrap_diff_ci(x, y, n_resamples=n_resamples, seed=seed)
    mdd, needed = two_sample_power(pooled_sd(x, y), len(x), len(y), target)
    if len(x) < 2 or len(y) < 2:
        return Comparison(ci.estimate, ci.low, ci.high, None, math.nan, math.nan, 0, mdd, needed)
    with _quiet(), np.errstate(all="ignore"):
        res = stats.ttest_ind(x, y, equal_var=False)
    t, p = float(res.statistic), float(res.pvalue)
    return Comparison(ci.estimate, ci.low, ci.high, WELCH, t, p, 0, mdd, needed)


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p of one family (``multipletests(method="holm")``); NaN entries (no
    test) stay NaN and do not count towards the family's size."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return out
