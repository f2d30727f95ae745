"""Names every stage shares: datasets, metrics, profiles, MLflow tags and the run queries.

One place, so that the pipeline that writes runs and the report and tuner that read them back
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Profiles a config can resolve to (``auto`` picks paper or demo), in table order.
PROFILES = ("paper", "cpu", "demo")
#: Profiles built on another one: its layers first, then their own.
PROFILE_BASES = {"cpu": "demo"}
#: The fine-tuning datasets and how tables and figures spell them.
DATASET_TITLES = {"glas": "GlaS", "crag": "CRAG"}
DATASETS = tuple(DATASET_TITLES)
#: COCO metrics of one fine-tuning run (percent), as ``coco_ap`` returns them.
COCO_METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")
#: The two metrics of the paper's table and their column names there.
TABLE_METRICS = {"bbox_AP": "AP_bb", "segm_AP": "AP_mk"}
#: The exported backbone architecture, as run names spell it.
BACKBONE = "r18"
#: Frozen-backbone probes: (dataset, probe) -> the metrics each child logs (percent). The
#: tissue probes classify NCT-style patches; the dense probe segments glands on the detector's
#: data. Parents carry ``<dataset>_<probe>_<metric>_mean`` / ``_std`` and
#: ``<dataset>_<probe>_seeds``; children log ``per_image.json`` (see ``benchmark.probe``).
PROBES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tissue", "knn"): ("balanced_accuracy", "macro_f1"),
    ("tissue", "linear"): ("balanced_accuracy", "macro_f1"),
    ("glas", "dense"): ("dice", "iou"),
    ("crag", "dense"): ("dice", "iou"),
}
#: How tables spell probe datasets, probes and metrics: ``Tissue k-NN bAcc``.
PROBE_TITLES = {
    "tissue": "Tissue",
    "glas": "GlaS",
    "crag": "CRAG",
    "knn": "k-NN",
    "linear": "linear",
    "dense": "dense",
    "balanced_accuracy": "bAcc",
    "macro_f1": "F1",
    "dice": "Dice",
    "iou": "IoU",
}
#: The probe metric of each (dataset, probe) that tables show first.
PROBE_HEADLINE = {key: metrics[0] for key, metrics in PROBES.items()}
#: The per-image artifact of a probe child.
PROBE_PER_IMAGE_FILE = "per_image.json"
#: Reference rows that every table shows beside the SSL methods.
REFERENCE_METHODS = ("random", "supervised")
#: Optimizers the engine can build (``optim.name``).
OPTIMIZERS = ("sgd", "lars")

# MLflow tags.
RUN_KIND_TAG = "run_kind"
STAGE_TAG = "stage"
METHOD_TAG = "method"
CONFIG_HASH_TAG = "config_hash"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
#: The run's description in the MLflow UI.
DESCRIPTION_TAG = "mlflow.note.content"
#: ``run_kind`` of a benchmark parent (one per method and config hash).
BENCHMARK_KIND = "benchmark"


def quote(value: Any) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return str(value).replace("'", "\\'")


def benchmark_filter(method: str | None = None, config_hash: str | None = None) -> str:
    """MLflow filter of benchmark parents (of one method and config hash, when given)."""
    clauses = [f"tags.{RUN_KIND_TAG} = '{BENCHMARK_KIND}'"]
    if method is not None:
        clauses.append(f"tags.{METHOD_TAG} = '{quote(method)}'")
    if config_hash is not None:
        clauses.append(f"tags.{CONFIG_HASH_TAG} = '{quote(config_hash)}'")
    return " and ".join(clauses)


def child_filter(parent_id: str, stage: str, tags: Mapping[str, Any] | None = None) -> str:
    """MLflow filter of the ``stage`` children of ``parent_id`` carrying ``tags``."""
    clauses = [
        f"tags.`{PARENT_RUN_ID_TAG}` = '{quote(parent_id)}'",
        f"tags.{STAGE_TAG} = '{stage}'",
    ]
    clauses += [f"tags.{k} = '{quote(v)}'" for k, v in (tags or {}).items()]
    return " and ".join(clauses)


#: Environment variables the CLI reads (prefixed, so a generic PROFILE or PORT set for
#: something else never changes a benchmark); the Makefile passes its variables explicitly.
PROFILE_ENV = "CONCL_BENCH_PROFILE"
PORT_ENV = "CONCL_BENCH_PORT"
