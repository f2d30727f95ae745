"""The benchmark: pre-train (or reuse) → fine-tune every dataset × seed → aggregate.

Every step reads only what the previous one wrote (``backbone.pth``, ``metrics.json``), so
an interrupted benchmark run again continues where it stopped and a finished seed is
never re-run. One MLflow parent per (method, config hash) holds the aggregates; children
hold the pre-training and each fine-tuning run.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from omegaconf import DictConfig

from benchmark.config import config_hash, flatten, pretrain_hash, to_container
from benchmark.core.contracts import World
from benchmark.core.registry import get_method
from benchmark.core.schema import DATASET_TITLES
from benchmark.pretrain import run_pretrain
from benchmark.report.table import results_table
from benchmark.training import checkpoints as ckpt
from benchmark.training.progress import main_printer


def finetune_hash(cfg: DictConfig) -> str:
    """What the transfer stage computes: the ``finetune`` section without execution keys."""
    return config_hash(cfg, ("finetune",))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def transfer_dir(cfg: DictConfig, weights: Path | None, external: bool) -> Path:
    """Where the fine-tuning runs of this backbone and recipe live."""
    if external and weights is not None:
        base = Path(cfg.output_root) / f"weights-{_file_digest(weights)}"
    else:
        base = ckpt.run_dir(cfg.output_root, cfg.method.name, pretrain_hash(cfg))
    return base / f"finetune-{finetune_hash(cfg)}"


def aggregate(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed) and count of the seeds' box and mask
    AP per dataset: ``glas_bbox_AP_mean``, ``glas_bbox_AP_std``, ``glas_seeds``, …"""
    out: dict[str, float] = {}
    for name, runs in per_seed.items():
        for metric in ("bbox_AP", "segm_AP"):
            values = [r[metric] for r in runs]
            if not values:
                continue
            out[f"{name}_{metric}_mean"] = statistics.fmean(values)
            out[f"{name}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
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
    from benchmark.transfer.finetune import finetune

    say = main_printer(world)
    method_cls = get_method(cfg.method.name)
    external = weights is not None
    tracker = parent = None
    if world.is_main:
        from benchmark.tracking import open_parent

        label = f"weights-{_file_digest(weights)}" if external else None
        tracker, parent = open_parent(cfg, label, parent_tags)
        if external:
            tracker.set_tags(parent, {"weights": str(weights)})
    status = "FAILED"
    try:
        if not external and method_cls.pretrains:
            result = run_pretrain(cfg, world, parent=(tracker, parent) if world.is_main else None)
            weights = result.backbone_path
        if world.is_main and weights is not None:
            tracker.set_tags(parent, {"backbone": str(weights)})
        base = transfer_dir(cfg, weights, external)
        per_seed: dict[str, list[dict[str, float]]] = {}
        stopped = False
        for name in cfg.finetune.datasets:
            per_seed[name] = []
            for seed in range(1, cfg.finetune.seeds + 1):
                if stopped:
                    break
                metrics = _one_seed(
                    cfg,
                    name,
                    seed,
                    weights,
                    world,
                    base,
                    tracker,
                    parent,
                    finetune,
                    stop_after_iter,
                )
                if metrics:
                    per_seed[name].append(metrics)
                    if on_seed is not None and not on_seed(name, seed, metrics):
                        stopped = True
        if stopped:
            status = "KILLED"
            return aggregate(per_seed)
        if stop_after_iter is not None:
            status = "KILLED"
            return {}
        summary = aggregate(per_seed)
        if world.is_main:
            tracker.log_metrics(parent, summary, step=0)
            label = cfg.method.name if not external else f"{Path(weights).name}"
            epochs = cfg.pretrain.epochs if method_cls.pretrains and not external else "–"
            say("\n" + results_table(label, epochs, summary))
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(parent, status)


def _one_seed(
    cfg, name, seed, weights, world, base, tracker, parent, finetune, stop_after_iter
) -> dict[str, float]:
    out_dir = base / name / f"seed{seed}"
    child = None
    if world.is_main:
        child, created = tracker.child_run(parent, "finetune", {"dataset": name, "seed": seed})
        if created:
            section = to_container(cfg)["finetune"]
            params = flatten({k: v for k, v in section.items() if k not in DATASET_TITLES})
            params.update(flatten(section[name], f"{name}."))
            params.update({"weights": str(weights), "finetune_hash": finetune_hash(cfg)})
            tracker.log_params(child, params)
        elif tracker.status(child) == "FINISHED" and (out_dir / "metrics.json").is_file():
            import json

            return json.loads((out_dir / "metrics.json").read_text())
        tracker.set_running(child)

    def on_log(metrics: dict[str, float], iteration: int) -> None:
        tracker.log_metrics(child, {f"train_{k}": v for k, v in metrics.items()}, iteration)

    status = "FAILED"
    try:
        result = finetune(
            cfg,
            name,
            seed,
            weights,
            world,
            out_dir,
            on_log if world.is_main else None,
            stop_after_iter,
        )
        status = "FINISHED" if result.metrics else "KILLED"
        if world.is_main and result.metrics:
            tracker.log_metrics(child, result.metrics, step=cfg.finetune[name].iterations)
        return result.metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if child is not None:
            tracker.finish(child, status)
