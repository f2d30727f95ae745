"""A store of hand-chosen values for the report's tests, and helpers to read what they give.

``fill`` writes the benchmarks of ``BENCHMARKS`` plus everything the report must leave
out; ``conftest.built`` builds one report from it for the whole folder.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from scipy import stats

from benchmark.report.statistics import N_RESAMPLES, RNG_SEED
from benchmark.tracking import Tracker

EXPERIMENT = "concl-bench"

# (profile, method, epochs, config hash) -> dataset -> [(bbox_AP, segm_AP) per seed]
BENCHMARKS: dict[tuple[str, str, int, str], dict[str, list[tuple[float, float]]]] = {
    ("paper", "mocov2", 200, "mmmm2000pppp"): {
        "glas": [(50, 51), (52, 53), (54, 55)],
        "crag": [(48, 50), (50, 52)],
    },
    ("paper", "concl", 200, "cccc2000pppp"): {
        "glas": [(56, 57), (57, 58), (58, 59), (61, 62)],
        "crag": [(55, 50.5), (56, 51.5)],
    },
    ("paper", "densecl", 200, "dddd2000pppp"): {"glas": [(53, 54)], "crag": [(51, 49)]},
    ("paper", "concl", 400, "cccc4000pppp"): {
        "glas": [(58, 59), (59, 60)],
        "crag": [(54, 53), (55, 54)],
    },
    ("demo", "mocov2", 2, "aaaa1111demo"): {"glas": [(20, 19), (22, 21)]},
    ("demo", "mocov2", 2, "bbbb2222demo"): {"glas": [(21, 22)]},
    ("demo", "concl", 2, "cccc3333demo"): {"glas": [(25, 24), (27, 26)]},
    ("demo", "random", 2, "rrrr0000demo"): {"glas": [(15, 14)]},
}
PAPER_CONCL = ("paper", "concl", 200, "cccc2000pppp")


def add_benchmark(tracker: Tracker, profile, method, epochs, chash, tags=None) -> str:
    return tracker.parent_run(
        method,
        chash,
        {
            "epochs": str(epochs),
            "profile": profile,
            "pretrain_hash": f"pre-{chash}",
            **(tags or {}),
        },
    )


def add_seed(tracker: Tracker, parent: str, ds: str, seed: int, bbox, segm, status="FINISHED"):
    child, _ = tracker.child_run(parent, "finetune", {"dataset": ds, "seed": seed})
    tracker.log_metrics(child, {"bbox_AP": bbox, "segm_AP": segm, "bbox_AP50": 90.0}, step=100)
    tracker.finish(child, status)
    return child


def fill(tracker: Tracker) -> dict[str, str]:
    """The store: the benchmarks above plus everything the report must leave out."""
    ids: dict[str, str] = {}
    for (profile, method, epochs, chash), per_ds in BENCHMARKS.items():
        parent = add_benchmark(tracker, profile, method, epochs, chash)
        ids[chash] = parent
        for ds, values in per_ds.items():
            for seed, (bbox, segm) in enumerate(values, start=1):
                ids[f"{chash}/{ds}/{seed}"] = add_seed(tracker, parent, ds, seed, bbox, segm)
        tracker.finish(parent)
    concl = ids[PAPER_CONCL[3]]
    # not results: an unfinished and a failed seed, a tuning trial, a pre-training child
    add_seed(tracker, concl, "glas", 5, 0.0, 0.0, status="RUNNING")
    add_seed(tracker, concl, "glas", 6, 99.0, 99.0, status="FAILED")
    trial = add_benchmark(
        tracker, "paper", "concl", 200, "tttt2000tune", {"tune_study": "concl-s1"}
    )
    add_seed(tracker, trial, "glas", 1, 99.0, 99.0)
    pre, _ = tracker.child_run(
        concl, "pretrain", {"method": "concl", "pretrain_hash": "pre-cccc2000pppp"}
    )
    for epoch, loss in ((1, 10.0), (2, 8.0), (3, 7.0)):
        tracker.log_metrics(pre, {"loss": loss, "bbox_AP": 99.0}, step=epoch)
    tracker.finish(pre)
    ids["pretrain"] = pre
    # a resumed fine-tuning run logs steps 20 and 30 twice: the later values count
    child = ids[f"{PAPER_CONCL[3]}/glas/1"]
    history = [(10, 3.0), (20, 2.5), (30, 2.4), (20, 2.0), (30, 1.5)]
    tracker.client.log_batch(
        child, metrics=[Metric("train_loss", v, 1000 + i, s) for i, (s, v) in enumerate(history)]
    )
    for seed in (2, 3, 4):
        run = ids[f"{PAPER_CONCL[3]}/glas/{seed}"]
        tracker.log_metrics(run, {"train_loss": 2.0 + seed}, step=10)
    return ids


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    """t = (m1 - m2) / sqrt(s1²/n1 + s2²/n2), Welch–Satterthwaite df, two-sided p."""
    v1, v2 = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(a) - 1) + v2**2 / (len(b) - 1))
    return t, 2 * stats.t.sf(abs(t), df)


def paired_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Over the seeds both lists have (the first ``min(len)``): mean difference d̄,
    t = d̄ / (s_d / √n) and the two-sided p with n − 1 degrees of freedom."""
    d = [x - y for x, y in zip(a, b, strict=False)]
    n = len(d)
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(n))
    return statistics.fmean(d), t, 2 * stats.t.sf(abs(t), n - 1)


def scipy_ci(x: list[float]) -> tuple[float, float]:
    """The report's interval of a mean, from scipy directly with the report's settings."""
    res = stats.bootstrap(
        (np.asarray(x, dtype=float),),
        np.mean,
        n_resamples=N_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(RNG_SEED),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def values(key, ds: str, metric: int) -> list[float]:
    return [float(v[metric]) for v in BENCHMARKS[key][ds]]


def row(summary: pd.DataFrame, profile: str, method: str, chash: str) -> pd.Series:
    hit = summary[(summary["profile"] == profile) & (summary["config_hash"] == chash)]
    assert len(hit) == 1 and hit["method"].iloc[0] == method
    return hit.iloc[0]


def section(md: str, title: str) -> str:
    """The text under ``## title`` or ``### title`` up to the next heading of any level."""
    start = md.index(f"## {title}")
    end = md.find("\n#", start + 1)
    return md[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ")
    ]
