"""A store of hand-chosen values for the report's tests, and helpers to read what they give.

``fill`` writes the benchmarks of ``BENCHMARKS`` plus everything the report must leave
out; ``conftest.built`` builds one report from it for the whole folder.
"""

from __future__ import annotations

import json
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
PAPER_MOCOV2 = ("paper", "mocov2", 200, "mmmm2000pppp")
PAPER_SUPERVISED = ("paper", "supervised", 200, "ssss2000pppp")  # probes only, no fine-tuning
PAPER_CONCL_400 = ("paper", "concl", 400, "cccc4000pppp")

#: The tissue probe's test set: 12 patches of 3 classes.
TISSUE_LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
# key -> (dataset, probe) -> per seed: tissue predictions, or dense per-image Dice (%)
PROBE_RUNS: dict[tuple, dict[tuple[str, str], list[list]]] = {
    PAPER_MOCOV2: {
        ("tissue", "knn"): [
            [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 0],
            [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 0, 0, 1, 1, 2, 1, 2, 2, 0, 2],
        ],
        ("glas", "dense"): [
            [80, 82, 78, 85, 75], [81, 80, 79, 84, 76], [79, 83, 77, 86, 74],
        ],
    },
    PAPER_CONCL: {
        ("tissue", "knn"): [
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2],
        ],
        ("glas", "dense"): [
            [84, 85, 82, 88, 80], [85, 84, 83, 87, 81], [83, 86, 82, 89, 79],
        ],
    },
    PAPER_SUPERVISED: {
        ("tissue", "knn"): [
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 1, 2],
            [0, 0, 0, 0, 1, 1, 0, 1, 2, 2, 2, 1],
        ],
    },
    PAPER_CONCL_400: {  # seed 2 logs no per_image.json
        ("tissue", "knn"): [
            [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2],
        ],
    },
    ("demo", "mocov2", 2, "aaaa1111demo"): {
        ("tissue", "knn"): [
            [0, 1, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
            [0, 0, 0, 0, 1, 2, 1, 1, 2, 2, 2, 2],
        ],
    },
    ("demo", "random", 2, "rrrr0000demo"): {
        ("tissue", "knn"): [
            [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ],
    },
}  # fmt: skip
NO_PER_IMAGE = (PAPER_CONCL_400, ("tissue", "knn"), 2)


def bacc_by_hand(labels: list[int], predictions: list[int]) -> float:
    """Mean over the classes in ``labels`` of the share of that class predicted right, in %."""
    classes = sorted(set(labels))
    recalls = []
    for c in classes:
        hits = [p == c for y, p in zip(labels, predictions, strict=True) if y == c]
        recalls.append(sum(hits) / len(hits))
    return 100 * sum(recalls) / len(recalls)


def f1_by_hand(labels: list[int], predictions: list[int]) -> float:
    """Mean over the classes in ``labels`` of 2 TP / (2 TP + FP + FN), in %."""
    scores = []
    for c in sorted(set(labels)):
        pairs = list(zip(labels, predictions, strict=True))
        tp = sum(y == c and p == c for y, p in pairs)
        fp = sum(y != c and p == c for y, p in pairs)
        fn = sum(y == c and p != c for y, p in pairs)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(scores) / len(scores)


def iou_of(dice: float) -> float:
    """IoU of one image from its Dice (%): J = D / (2 − D) on fractions."""
    return 100 * (dice / 100) / (2 - dice / 100)


def probe_metrics(ds: str, spec: list) -> tuple[dict[str, float], dict]:
    """The child's metrics and ``per_image.json`` of one probe seed in ``PROBE_RUNS``."""
    if ds == "tissue":
        metrics = {
            "balanced_accuracy": bacc_by_hand(TISSUE_LABELS, spec),
            "macro_f1": f1_by_hand(TISSUE_LABELS, spec),
        }
        per_image = {"labels": TISSUE_LABELS, "predictions": spec, "classes": ["a", "b", "c"]}
        return metrics, per_image
    iou = [iou_of(d) for d in spec]
    metrics = {"dice": statistics.fmean(spec), "iou": statistics.fmean(iou)}
    return metrics, {"dice": [float(d) for d in spec], "iou": iou}


def probe_values(key, ds: str, probe: str, metric: str) -> list[float]:
    return [probe_metrics(ds, spec)[0][metric] for spec in PROBE_RUNS[key][ds, probe]]


def add_probe(tracker, parent, ds, probe, seed, metrics, per_image=None, status="FINISHED"):
    child, _ = tracker.child_run(parent, "probe", {"dataset": ds, "probe": probe, "seed": seed})
    tracker.log_metrics(child, {**metrics, "time_s": 0.5}, step=0)
    if per_image is not None:
        tracker.log_text(child, json.dumps(per_image), "per_image.json")
    tracker.finish(child, status)
    return child


def fill_probes(tracker: Tracker, ids: dict[str, str]) -> None:
    """The probe runs of ``PROBE_RUNS`` plus those the report must leave out."""
    for key, per in PROBE_RUNS.items():
        if key[3] not in ids:
            ids[key[3]] = add_benchmark(tracker, *key)
            tracker.finish(ids[key[3]])
        for (ds, probe), specs in per.items():
            for seed, spec in enumerate(specs, start=1):
                metrics, per_image = probe_metrics(ds, spec)
                if (key, (ds, probe), seed) == NO_PER_IMAGE:
                    per_image = None
                run = add_probe(tracker, ids[key[3]], ds, probe, seed, metrics, per_image)
                ids[f"{key[3]}/{ds}/{probe}/{seed}"] = run
    concl = ids[PAPER_CONCL[3]]
    # not results: a running and a failed probe, a probe the report does not know
    add_probe(tracker, concl, "tissue", "knn", 4, {"balanced_accuracy": 0.0}, status="RUNNING")
    add_probe(tracker, concl, "glas", "dense", 4, {"dice": 0.0, "iou": 0.0}, status="FAILED")
    add_probe(tracker, concl, "tissue", "svm", 1, {"balanced_accuracy": 99.0})


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
    fill_probes(tracker, ids)
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
