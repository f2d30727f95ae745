"""The benchmark: pre-train (or reuse) → probe → fine-tune every dataset × seed → aggregate.

Every step reads only what the previous one wrote (``backbone.pth``, ``metrics.json``), so
an interrupted benchmark run again continues where it stopped and a finished seed is
never re-run. One MLflow parent per (method, config hash) holds the aggregates; children
hold the pre-training, each probe and each fine-tuning run. A re-run that finds everything
done changes no run: no status, no metric step. The probes run before the
detector because they take seconds to minutes and say first whether the backbone learnt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

from mlflow.entities import DatasetInput
from omegaconf import DictConfig

from benchmark.config import finetune_hash, pretrain_hash, probe_hash
from benchmark.core.contracts import World
from benchmark.core.registry import get_method
from benchmark.core.schema import DATASET_TITLES
from benchmark.lineage import coco_inputs
from benchmark.pretrain import run_pretrain
from benchmark.probe.stage import jobs as probe_jobs
from benchmark.probe.stage import run_probes
from benchmark.probe.tissue import check_roots as check_tissue_roots
from benchmark.report.statistics import seed_summary
from benchmark.report.table import results_table
from benchmark.system_metrics import system_metrics
from benchmark.tracking import (
    MlflowMetrics,
    open_finetune_run,
    open_parent,
    run_status,
)
from benchmark.training import checkpoints as ckpt
from benchmark.training.progress import main_printer
from benchmark.transfer.finetune import finetune, prepare_dataset_for, read_metrics


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def backbone_dir(cfg: DictConfig, weights: Path | None, external: bool) -> Path:
    """The folder of this backbone: its pre-training run, or one per external weights file."""
    if external and weights is not None:
        return Path(cfg.output_root) / f"weights-{_file_digest(weights)}"
    return ckpt.run_dir(cfg.output_root, cfg.method.name, pretrain_hash(cfg))


def transfer_dir(cfg: DictConfig, weights: Path | None, external: bool) -> Path:
    """Where the fine-tuning runs of this backbone and recipe live."""
    return backbone_dir(cfg, weights, external) / f"finetune-{finetune_hash(cfg)}"


def probe_dir(cfg: DictConfig, weights: Path | None, external: bool) -> Path:
    """Where the probes of this backbone and probe config live."""
    return backbone_dir(cfg, weights, external) / f"probe-{probe_hash(cfg)}"


def detection_inputs(cfg: DictConfig, name: str, world: World) -> list[DatasetInput]:
    """The train and test sets of detection dataset ``name`` as MLflow inputs (rank 0; every
    rank takes part in making the conversion on first use, as the fine-tune would)."""
    root = prepare_dataset_for(cfg, name, world)
    if not world.is_main:
        return []
    return coco_inputs(DATASET_TITLES[name], root, cfg.profile, cfg.finetune[name].synthetic)


def aggregate(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), the report's 95% interval over
    seeds (from two seeds on) and count of the seeds' box and mask AP per dataset:
    ``glas_bbox_AP_mean``, ``_std``, ``_ci_low``, ``_ci_high``, ``glas_seeds``, …"""
    out: dict[str, float] = {}
    for name, runs in per_seed.items():
        for metric in ("bbox_AP", "segm_AP"):
            values = [r[metric] for r in runs]
            if not values:
                continue
            for stat, value in seed_summary(values).items():
                out[f"{name}_{metric}_{stat}"] = value
            out[f"{name}_seeds"] = float(len(values))
    return out


#: Called after each finished seed with (dataset, seed, metrics); ``False`` stops the benchmark.
SeedCallback = Callable[[str, int, dict[str, float]], bool]


def run_benchmark(
    cfg: DictConfig,
    world: World,
    weights: Path | None = None,
    stop_after_iter: int | None = None,
    on_seed: SeedCallback | None = None,
    parent_tags: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """The whole benchmark for ``cfg.method``; ``weights`` skips pre-training (any
    torchvision-format ResNet state_dict). Returns the aggregates (rank 0).

    ``on_seed`` lets a caller stop after any seed (an Optuna pruner): the remaining seeds
    are skipped, the parent is marked KILLED and the aggregates of the finished seeds are
    returned. ``parent_tags`` go on the parent run if this call creates it.
    """
    say = main_printer(world)
    method_cls = get_method(cfg.method.name)
    external = weights is not None
    label = f"weights-{_file_digest(weights)}" if weights is not None else None
    if any(ds == "tissue" for ds, _ in probe_jobs(cfg)) and not cfg.probe.tissue.synthetic:
        check_tissue_roots(cfg)  # before hours of pre-training, not after
    run = open_parent(cfg, label, parent_tags, world=world)
    tracker, parent = run
    with run_status(tracker, parent) as outcome:
        if external:
            tracker.set_tags(parent, {"weights": str(weights)})
        if not external and method_cls.pretrains:
            weights = run_pretrain(cfg, world, run).backbone_path
        if weights is not None:
            tracker.set_tags(parent, {"backbone": str(weights)})
        base = transfer_dir(cfg, weights, external)
        probes: dict[str, float] = {}
        if cfg.probe.probes:
            dense = "dense" in cfg.probe.probes
            roots = {n: prepare_dataset_for(cfg, n, world) for n in cfg.finetune.datasets if dense}
            probes = run_probes(
                cfg, world, weights, probe_dir(cfg, weights, external), tracker, parent, roots, say
            )

        def one_seed(name: str, seed: int, inputs: list[DatasetInput]) -> dict[str, float]:
            """One (dataset, seed) fine-tune under its MLflow child; a finished one is read
            back from its ``metrics.json`` (a damaged one is a one-line CheckpointError
            saying to delete it, before its run is touched)."""
            out_dir = base / name / f"seed{seed}"
            scored = read_metrics(out_dir)
            child, done = open_finetune_run(
                tracker, parent, cfg, name, seed, weights, scored is not None
            )
            if done and scored is not None:
                return scored
            tracker.log_inputs(child, inputs)
            final = cfg.finetune[name].iterations
            logger = MlflowMetrics(tracker, child, False, prefix="train_", final_step=final)
            with (
                run_status(tracker, child) as seed_outcome,
                system_metrics(tracker.uri, child, cfg, world.device),
            ):
                result = finetune(
                    cfg, name, seed, weights, world, out_dir, [logger], stop_after_iter
                )
                if result.already_done:  # scored, then stopped before MLflow heard of it
                    tracker.log_metrics(child, result.metrics, step=final)
                if not result.metrics:
                    seed_outcome.stopped()
                return result.metrics

        per_seed: dict[str, list[dict[str, float]]] = {}
        stopped = False
        for name in cfg.finetune.datasets:
            per_seed[name] = []
            inputs = detection_inputs(cfg, name, world)
            tracker.log_inputs(parent, inputs)
            for seed in range(1, cfg.finetune.seeds + 1):
                if stopped:
                    break
                metrics = one_seed(name, seed, inputs)
                if metrics:
                    per_seed[name].append(metrics)
                    if on_seed is not None and not on_seed(name, seed, metrics):
                        stopped = True
        if stopped or stop_after_iter is not None:
            outcome.stopped()
            return {**aggregate(per_seed), **probes} if stopped else {}
        summary = {**aggregate(per_seed), **probes}
        tracker.log_summary(parent, summary)  # a re-run of a finished benchmark logs nothing
        shown = cfg.method.name if not external else f"{Path(weights).name}"
        epochs = cfg.pretrain.epochs if method_cls.pretrains and not external else "–"
        say("\n" + results_table(shown, epochs, summary))
        return summary
