"""MLflow tracking: one parent run per (method, config hash), one child run per stage.

Only global rank 0 talks to MLflow: other ranks get a ``NullTracker`` whose calls do nothing,
so the stages call the tracker unconditionally. Every call goes through ``MlflowClient`` with
an explicit run id, so no process-global "active run" leaks between stages or into torchrun
children. Metrics are sent in batches (each sqlite round trip costs milliseconds). The
training loops publish events; ``MlflowMetrics`` subscribes to them; ``run_status`` ends a run
FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from benchmark.config import (
    config_hash,
    finetune_hash,
    flatten,
    pretrain_hash,
    probe_hash,
    to_container,
    to_yaml,
)
from benchmark.core.contracts import World
from benchmark.core.schema import (
    BACKBONE,
    BENCHMARK_KIND,
    CONFIG_HASH_TAG,
    DATASET_TITLES,
    DESCRIPTION_TAG,
    METHOD_TAG,
    PARENT_RUN_ID_TAG,
    RUN_KIND_TAG,
    STAGE_TAG,
    benchmark_filter,
    child_filter,
)
from benchmark.training.loop import Callback
from benchmark.training.schedules import scaled_lr

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000


def tracking_uri(configured: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` wins, then the config, then the project's sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_root_for(uri: str, configured: str | None) -> str | None:
    """Where new experiments keep artifacts: the configured folder, except that the default
    follows a sqlite store elsewhere (``sqlite:///x/mlflow.db`` → ``x/artifacts``), so a
    store pointed away from ``mlruns/`` (tests, a copy) never writes into it."""
    if configured == DEFAULT_ARTIFACT_ROOT and uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    return configured


def git_commit() -> str:
    """The checked-out commit (``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def _default_child_name(stage: str, tags: Mapping[str, Any]) -> str:
    """``finetune glas seed 3``: the stage, then ``key value`` pairs (dataset values bare)."""
    words = [stage]
    for key, value in tags.items():
        words += [str(value)] if key in ("dataset", "method") else [key, str(value)]
    return " ".join(words)


class Tracker:
    """Find-or-create runs by tags so that re-running a command continues, never duplicates."""

    def __init__(self, experiment: str, uri: str | None = None, artifact_root: str | None = None):
        self.uri = tracking_uri(uri)
        artifact_root = artifact_root_for(self.uri, artifact_root)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if artifact_root and "://" not in artifact_root:
                location = Path(artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location or artifact_root
            )

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def parent_run(
        self,
        method: str,
        config_hash: str,
        tags: Mapping[str, str],
        run_name: str | None = None,
        created_tags: Mapping[str, str] | None = None,
    ) -> str:
        """The benchmark run of ``method`` at ``config_hash``, created on first use.

        ``created_tags`` are set only when the run is made here (e.g. the Optuna trial that
        asked for it, or ``mlflow.parentRunId`` to nest it under that trial).
        """
        run_id = self._find(benchmark_filter(method, config_hash))
        if run_id is None:
            all_tags = {
                RUN_KIND_TAG: BENCHMARK_KIND,
                METHOD_TAG: method,
                CONFIG_HASH_TAG: config_hash,
            }
            all_tags.update(tags)
            all_tags.update(created_tags or {})
            run = self.client.create_run(
                self.experiment_id, tags=all_tags, run_name=run_name or f"{method}-{config_hash}"
            )
            run_id = run.info.run_id
        return run_id

    def child_run(
        self, parent_id: str, stage: str, tags: Mapping[str, str], run_name: str | None = None
    ) -> tuple[str, bool]:
        """The ``stage`` child of ``parent_id`` matching ``tags``; ``True`` when newly made.

        The default name is the stage and the tag values (``finetune glas seed 3`` reads
        better in the UI's run list than ids).
        """
        run_id = self._find(child_filter(parent_id, stage, tags))
        if run_id is not None:
            return run_id, False
        all_tags = {PARENT_RUN_ID_TAG: parent_id, STAGE_TAG: stage, RUN_KIND_TAG: stage}
        all_tags.update({k: str(v) for k, v in tags.items()})
        run = self.client.create_run(
            self.experiment_id, tags=all_tags, run_name=run_name or _default_child_name(stage, tags)
        )
        return run.info.run_id, True

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def set_running(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


def parent_run_name(label: str, epochs: Any, profile: str, external: bool = False) -> str:
    """``concl r18 ep400`` (``… demo`` on the demo profile): what the UI's run list shows."""
    words = [label, BACKBONE] if not external else [label]
    if not external and label != "random":
        words.append(f"ep{epochs}")
    if profile != "paper":
        words.append(profile)
    return " ".join(words)


def parent_description(cfg: Any, label: str, external: bool = False) -> str:
    """The parent's description (the UI's "Description" field): what this run is."""
    ft = cfg.finetune
    datasets = ", ".join(DATASET_TITLES[d] for d in ft.datasets)
    if external:
        source = f"Scores the external ResNet-18 weights `{label}`"
    elif label == "random":
        source = "Random-initialisation baseline (no pre-training)"
    else:
        source = (
            f"Benchmark of **{label}**: pre-trains ResNet-18 for {cfg.pretrain.epochs} epochs "
            f"(global batch {cfg.pretrain.batch_size}) on `{cfg.data.root}`"
        )
    return (
        f"{source}, then fine-tunes Mask R-CNN R18-FPN on {datasets} with "
        f"{ft.seeds} seed{'s' if ft.seeds != 1 else ''} each and reports COCO AP. "
        f"Profile `{cfg.profile}`, config hash `{config_hash(cfg)}` (the resolved config is "
        "the `config.yaml` artifact). The aggregate metrics `<dataset>_<bbox|segm>_AP_<mean|std>` "
        "are on this run; "
        + (
            "each fine-tuning seed is a child run."
            if external or label == "random"
            else "the pre-training and each fine-tuning seed are its child runs."
        )
    )


class ParentRun(NamedTuple):
    """A benchmark's parent run and the tracker that writes it (a ``NullTracker`` and no id
    off rank 0): what the stages of one benchmark hang their child runs under."""

    tracker: Tracker
    run_id: str | None


def open_parent(
    cfg: Any,
    label: str | None = None,
    created_tags: Mapping[str, str] | None = None,
    world: World | None = None,
) -> ParentRun:
    """The tracker and the parent run of ``cfg`` (a resolved experiment config).

    The parent is keyed by (``label`` or the method, hash of the whole config), so the
    pre-training child and every fine-tuning child of one benchmark hang under one run.
    External weights pass a label naming their file's digest. ``created_tags`` go on the
    parent only if it is made here (an Optuna trial nests the parent it asked for).
    """
    if world is not None and not world.is_main:
        return ParentRun(NullTracker(), None)
    t = cfg.tracking
    tracker = Tracker(t.experiment, t.uri, t.artifact_root)
    name = label or cfg.method.name
    external = label is not None
    parent = tracker.parent_run(
        name,
        config_hash(cfg),
        {
            "epochs": str(cfg.pretrain.epochs),
            "profile": cfg.profile,
            "git_commit": git_commit(),
            "pretrain_hash": pretrain_hash(cfg),
        },
        run_name=parent_run_name(name, cfg.pretrain.epochs, cfg.profile, external),
        created_tags={
            DESCRIPTION_TAG: parent_description(cfg, name, external),
            **(created_tags or {}),
        },
    )
    if "config.yaml" not in {a.path for a in tracker.client.list_artifacts(parent)}:
        tracker.log_text(parent, to_yaml(cfg), "config.yaml")
        tracker.log_params(parent, compare_params(cfg))
    tracker.set_running(parent)
    return ParentRun(tracker, parent)


def compare_params(cfg: Any) -> dict[str, Any]:
    """The parent's params: what tells benchmarks apart in the UI's compare view (the
    method's hyperparameters, budget, batch, seeds); the whole config is ``config.yaml``."""
    resolved = to_container(cfg)
    params = flatten(resolved["method"], "method.")
    params.update(
        {
            "profile": cfg.profile,
            "pretrain.epochs": cfg.pretrain.epochs,
            "pretrain.batch_size": cfg.pretrain.batch_size,
            "optim.name": cfg.optim.name,
            "optim.lr": cfg.optim.lr,
            "finetune.seeds": cfg.finetune.seeds,
            "finetune.datasets": ",".join(cfg.finetune.datasets),
        }
    )
    return params


class NullTracker(Tracker):
    """The tracker of every rank but 0: each call does nothing, so stages need no rank checks."""

    def __init__(self) -> None:  # no client, no store
        self.uri, self.experiment_id = "", ""

    def parent_run(self, *args: Any, **kwargs: Any) -> str | None:  # type: ignore[override]
        return None

    def child_run(self, *args: Any, **kwargs: Any) -> tuple[str | None, bool]:  # type: ignore[override]
        return None, False

    def status(self, run_id: str | None) -> str:
        return ""

    def set_running(self, run_id: str | None) -> None:
        pass

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        pass

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(
        self, run_id: str | None, path: str | Path, artifact_path: str | None = None
    ) -> None:
        pass

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        pass

    def metric_history(self, run_id: str | None, key: str) -> list[tuple[int, float]]:
        return []


@dataclass
class RunOutcome:
    """How a stage ended when it returned normally: FINISHED, or KILLED when it stopped early
    on purpose (an interruption test, a pruned trial)."""

    status: str = "FINISHED"

    def stopped(self) -> None:
        self.status = "KILLED"


@contextmanager
def run_status(tracker: Tracker, run_id: str | None) -> Iterator[RunOutcome]:
    """End ``run_id`` FINISHED (or as the body set it), KILLED on Ctrl-C, FAILED on an error."""
    outcome = RunOutcome()
    status = "FAILED"
    try:
        yield outcome
        status = outcome.status
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if run_id is not None:
            tracker.finish(run_id, status)


class MlflowMetrics(Callback):
    """Sends a training loop's metrics to one run: per epoch (pre-training) or per logging
    window (fine-tuning, keys prefixed ``train_``), and the final metrics at ``final_step``."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str | None,
        per_epoch: bool,
        prefix: str = "",
        final_step: int = 0,
    ) -> None:
        self.tracker, self.run_id, self.per_epoch = tracker, run_id, per_epoch
        self.prefix, self.final_step = prefix, final_step

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.per_epoch:
            self.tracker.log_metrics(
                self.run_id, {f"{self.prefix}{k}": v for k, v in metrics.items()}, step
            )

    def on_epoch_end(self, metrics: Mapping[str, float], epoch: int) -> None:
        if self.per_epoch:
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)

    def on_done(self, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics, step=self.final_step)


def open_pretrain_run(
    tracker: Tracker, parent_id: str | None, cfg: Any, world: World, start_epoch: int
) -> str | None:
    """The pre-training child of ``parent_id`` (made with the config's params on first use),
    marked running and tagged with the epoch it resumes from."""
    digest = pretrain_hash(cfg)
    child, created = tracker.child_run(
        parent_id,
        "pretrain",
        {"method": cfg.method.name, "pretrain_hash": digest},
        run_name=f"pretrain {cfg.method.name} ep{cfg.pretrain.epochs}",
    )
    if created:
        o = cfg.optim
        params = flatten({k: v for k, v in to_container(cfg).items() if k != "finetune"})
        params.update(
            {
                "world_size": world.world_size,
                "device": world.device.type,
                "lr_scaled": scaled_lr(
                    o.lr, cfg.pretrain.batch_size, o.reference_batch, o.scale_lr
                ),
                "pretrain_hash": digest,
            }
        )
        tracker.log_params(child, params)
        tracker.log_text(child, to_yaml(cfg), "config.yaml")
    else:
        tracker.set_running(child)
    tracker.set_tags(
        child, {"resumed_from_epoch": start_epoch, "last_world_size": world.world_size}
    )
    return child


def open_finetune_run(
    tracker: Tracker,
    parent_id: str | None,
    cfg: Any,
    name: str,
    seed: int,
    weights: Any,
    scored: bool,
) -> tuple[str | None, bool]:
    """The (dataset, seed) fine-tuning child of ``parent_id``; ``True`` when it had already
    FINISHED and its metrics are on disk (``scored``): nothing to do. Otherwise it is marked
    running (with its params on first use)."""
    section = to_container(cfg)["finetune"]
    params = flatten({k: v for k, v in section.items() if k not in DATASET_TITLES})
    params.update(flatten(section[name], f"{name}."))
    params.update({"weights": str(weights), "finetune_hash": finetune_hash(cfg)})
    tags = {"dataset": name, "seed": seed}
    return _open_scored_child(tracker, parent_id, "finetune", tags, params, scored)


def _open_scored_child(
    tracker: Tracker,
    parent_id: str | None,
    stage: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    scored: bool,
) -> tuple[str | None, bool]:
    """The ``stage`` child with ``tags``: ``True`` when it had FINISHED and its result is on
    disk (``scored``); otherwise marked running, with ``params`` logged on first use."""
    child, created = tracker.child_run(parent_id, stage, tags)
    if created:
        tracker.log_params(child, params)
    elif scored and tracker.status(child) == "FINISHED":
        return child, True
    tracker.set_running(child)
    return child, False


def open_probe_run(
    tracker: Tracker,
    parent_id: str | None,
    cfg: Any,
    dataset: str,
    probe: str,
    seed: int,
    weights: Any,
    scored: bool,
) -> tuple[str | None, bool]:
    """The (dataset, probe, seed) child of ``parent_id``, as ``open_finetune_run`` does it:
    ``True`` when it had FINISHED and its metrics are on disk (``scored``)."""
    section = to_container(cfg)["probe"]
    params = flatten({k: v for k, v in section.items() if k not in ("tissue", "dense")})
    part = "dense" if probe == "dense" else "tissue"
    params.update(flatten(section[part], f"{part}."))
    params.update({"weights": str(weights), "probe_hash": probe_hash(cfg)})
    tags = {"dataset": dataset, "probe": probe, "seed": seed}
    return _open_scored_child(tracker, parent_id, "probe", tags, params, scored)
