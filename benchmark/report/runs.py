"""The report's input: finished benchmarks read back from MLflow into pandas frames.

Everything here reads the store (never the run folders, so a copied ``mlflow.db`` is
enough) or the published table, and defines the row keys and the method order that the
tables and figures share.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from benchmark.config import experiments_dir
from benchmark.core.schema import (
    BENCHMARK_KIND,
    CONFIG_HASH_TAG,
    DATASETS,
    METHOD_TAG,
    PARENT_RUN_ID_TAG,
    PROBE_PER_IMAGE_FILE,
    PROBES,
    PROFILES,
    RUN_KIND_TAG,
    STAGE_TAG,
    TABLE_METRICS,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

#: The paper's SSL methods in its row order; other SSL methods follow them alphabetically.
METHOD_ORDER = ("simclr", "byol", "pcl", "mocov1", "mocov2", "densecl", "concl")
#: Reference rows after every SSL method, in this order (see ``REFERENCE_METHODS``).
REFERENCE_ORDER = ("supervised", "random")
#: Methods whose parents carry an ``epochs`` tag that means nothing (no pre-training).
NO_PRETRAINING = ("random",)
#: What makes one row of the report: one benchmark parent's config.
KEYS = ["profile", "method", "epochs", "config_hash"]
#: The difference (percentage points) whose seeds-needed answer the report gives.
DEFAULT_DELTA = 1.0
#: What the comparison with the baseline fills per dataset and metric (``summary``), here so
#: that the tables need not import the statistics (scipy, statsmodels).
COMPARISON_STATS = (
    "delta", "delta_ci_low", "delta_ci_high", "test", "t", "p", "p_holm", "resolved",
    "pairs", "mdd", "seeds_needed",
)  # fmt: skip
SEED_COLUMNS = [*KEYS, "dataset", "seed", *TABLE_METRICS, "run_id", "parent_id", "pretrain_hash"]
#: Every metric a probe child logs (percent), in ``PROBES`` order.
PROBE_METRICS = tuple(dict.fromkeys(m for metrics in PROBES.values() for m in metrics))
PROBE_COLUMNS = [
    *KEYS, "dataset", "probe", "seed", *PROBE_METRICS, "run_id", "parent_id", "pretrain_hash",
]  # fmt: skip
#: The AP_bb table of the ConCL README (``TencentAILabHealthcare/ConCL``, README.md, section
#: "Models"), under ``experiments_dir()``.
PUBLISHED = Path("paper") / "published.csv"


def _tag(runs: pd.DataFrame, key: str) -> pd.Series:
    col = f"tags.{key}"
    return runs[col] if col in runs else pd.Series(None, index=runs.index, dtype=object)


def _metric(runs: pd.DataFrame, key: str) -> pd.Series:
    col = f"metrics.{key}"
    return runs[col] if col in runs else pd.Series(np.nan, index=runs.index)


def load_runs(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """All active runs in ``mlflow.search_runs``'s layout (``run_id``, ``status``,
    ``start_time``, ``tags.*``, ``metrics.*``), without setting the global tracking URI."""
    rows: list[dict] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status}
            row["start_time"] = run.info.start_time
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "status", "start_time"])


def _parents(runs: pd.DataFrame) -> pd.DataFrame:
    """The keys of every benchmark parent (tuning trials, with a ``tune_study`` tag, are not
    benchmark results): ``parent_id``, ``KEYS``, ``pretrain_hash``."""
    tuned = _tag(runs, "tune_study").fillna("").astype(str).str.strip() != ""
    parents = runs[(_tag(runs, RUN_KIND_TAG) == BENCHMARK_KIND) & ~tuned]
    method = _tag(parents, METHOD_TAG).astype(str)
    epochs = pd.to_numeric(_tag(parents, "epochs"), errors="coerce").astype("Int64")
    # random init and external weights: the config's epochs were never trained
    no_pretraining = (
        method.isin(NO_PRETRAINING)
        | method.str.startswith("weights-")
        | _tag(parents, "weights").notna()
    )
    return pd.DataFrame(
        {
            "parent_id": parents["run_id"],
            "profile": _tag(parents, "profile").fillna("unknown"),
            "method": method,
            "epochs": epochs.mask(no_pretraining),
            "config_hash": _tag(parents, CONFIG_HASH_TAG).fillna(""),
            "pretrain_hash": _tag(parents, "pretrain_hash"),
        }
    )


def seed_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per FINISHED fine-tuning child of a benchmark parent: the per-seed values that
    every statistic of the report starts from. Tuning trials (a ``tune_study`` tag), report
    runs and pre-training children are not benchmark results and are left out."""
    if runs.empty:
        return pd.DataFrame(columns=SEED_COLUMNS)
    kids = runs[(_tag(runs, STAGE_TAG) == "finetune") & (runs["status"] == "FINISHED")]
    kids = pd.DataFrame(
        {
            "run_id": kids["run_id"],
            "parent_id": _tag(kids, PARENT_RUN_ID_TAG),
            "dataset": _tag(kids, "dataset"),
            "seed": pd.to_numeric(_tag(kids, "seed"), errors="coerce").astype("Int64"),
            **{m: _metric(kids, m) for m in TABLE_METRICS},
        }
    )
    kids = kids[kids["dataset"].isin(DATASETS) & kids[list(TABLE_METRICS)].notna().any(axis=1)]
    out = kids.merge(_parents(runs), on="parent_id", how="inner")[SEED_COLUMNS]
    return ordered(out, extra=["dataset", "seed"]).reset_index(drop=True)


def probe_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per FINISHED probe child (``stage=probe``) of a benchmark parent, like
    ``seed_frame``: the parent's keys, ``dataset``, ``probe``, ``seed`` and every probe
    metric (NaN where that probe does not log it). Unknown (dataset, probe) pairs are left
    out, so a newer probe never breaks an older report."""
    if runs.empty:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    kids = runs[(_tag(runs, STAGE_TAG) == "probe") & (runs["status"] == "FINISHED")]
    kids = pd.DataFrame(
        {
            "run_id": kids["run_id"],
            "parent_id": _tag(kids, PARENT_RUN_ID_TAG),
            "dataset": _tag(kids, "dataset"),
            "probe": _tag(kids, "probe"),
            "seed": pd.to_numeric(_tag(kids, "seed"), errors="coerce").astype("Int64"),
            **{m: _metric(kids, m) for m in PROBE_METRICS},
        }
    )
    known = pd.Series(
        [(d, p) in PROBES for d, p in zip(kids["dataset"], kids["probe"], strict=True)],
        index=kids.index,
        dtype=bool,
    )
    kids = kids[known & kids[list(PROBE_METRICS)].notna().any(axis=1)]
    out = kids.merge(_parents(runs), on="parent_id", how="inner")[PROBE_COLUMNS]
    return ordered(out, extra=["dataset", "probe", "seed"]).reset_index(drop=True)


def load_per_image(client: MlflowClient, probes: pd.DataFrame) -> dict[str, dict | None]:
    """``per_image.json`` of every probe run, by run id; ``None`` where the artifact is
    missing, unreadable or malformed (that run's row then gets an interval over seeds only):
    a report never fails on a probe's side file."""
    out: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, ds, probe in zip(
            probes["run_id"], probes["dataset"], probes["probe"], strict=True
        ):
            try:
                path = client.download_artifacts(run_id, PROBE_PER_IMAGE_FILE, f"{tmp}/{run_id}")
                out[run_id] = _per_image(json.loads(Path(path).read_text()), PROBES[(ds, probe)])
            except Exception as exc:  # any store, file or format error degrades, by design
                log.warning("no per-image results of probe run %s (%s)", run_id, exc)
                out[run_id] = None
    return out


def _per_image(data: dict, metrics: Sequence[str]) -> dict | None:
    """The arrays of one ``per_image.json`` checked for shape: tissue (labels, predictions of
    one length, non-negative class indices), dense (a finite list per metric)."""
    if "labels" in data:
        labels = np.asarray(data["labels"], dtype=np.int64)
        predictions = np.asarray(data["predictions"], dtype=np.int64)
        if labels.ndim != 1 or labels.shape != predictions.shape or not len(labels):
            return None
        if labels.min() < 0 or predictions.min() < 0:
            return None
        return {"labels": labels, "predictions": predictions}
    per = {m: np.asarray(data[m], dtype=float) for m in metrics}
    if any(v.ndim != 1 or not len(v) or not np.isfinite(v).all() for v in per.values()):
        return None
    return per


def ordered(frame: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Paper profile first, then epochs (no pre-training last), then the paper's method order,
    other SSL methods alphabetically, then ``supervised`` and ``random``; other profiles
    follow the known ones alphabetically."""
    profile_rank = {p: i for i, p in enumerate(PROFILES)}
    method_rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    method_rank |= {m: len(METHOD_ORDER) + 1 + i for i, m in enumerate(REFERENCE_ORDER)}
    keys = frame.assign(
        _p=frame["profile"].map(profile_rank).fillna(len(PROFILES)),
        _e=frame["epochs"].astype("Float64").fillna(np.inf),
        _m=frame["method"].map(method_rank).fillna(len(METHOD_ORDER)),
    )
    order = ["_p", "profile", "_e", "_m", "method", "config_hash", *extra]
    return frame.loc[keys.sort_values(order, kind="stable").index]


def load_published(path: Path | None = None) -> pd.DataFrame:
    """The ConCL README's AP_bb table (method, epochs, glas_bbox_AP, crag_bbox_AP)."""
    return pd.read_csv(path or experiments_dir() / PUBLISHED)


def metric_curves(client: MlflowClient, run_ids: Iterable[str], key: str) -> pd.DataFrame:
    """``run_id, step, value`` of ``key``; a step logged twice (a resumed run repeats the
    steps after its checkpoint) keeps the later value."""
    rows = [
        (rid, m.step, m.timestamp, m.value)
        for rid in dict.fromkeys(run_ids)
        for m in client.get_metric_history(rid, key)
    ]
    frame = pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "value"])
    frame = frame.sort_values(["run_id", "step", "timestamp"], kind="stable")
    return frame.drop_duplicates(["run_id", "step"], keep="last").drop(columns="timestamp")


def pretrain_runs(runs: pd.DataFrame, summary: pd.DataFrame) -> pd.Series:
    """The pre-training child of each summary row (by method and pre-training hash, since a
    benchmark that reuses a finished pre-training has none of its own); finished ones first."""
    pre = runs[_tag(runs, STAGE_TAG) == "pretrain"]
    pre = pre.assign(
        _done=pre["status"] == "FINISHED",
        method=_tag(pre, METHOD_TAG),
        pretrain_hash=_tag(pre, "pretrain_hash"),
    ).sort_values(["_done", "start_time"], ascending=False)
    first = pre.drop_duplicates(["method", "pretrain_hash"])
    lookup = first.set_index(["method", "pretrain_hash"])["run_id"]
    found = [
        lookup.get((m, h)) if not pd.isna(e) else None
        for m, h, e in zip(
            summary["method"], summary["pretrain_hash"], summary["epochs"], strict=True
        )
    ]
    return pd.Series(found, index=summary.index, dtype=object)
