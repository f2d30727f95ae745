"""``probe``: every probe of one backbone, each (dataset, probe, seed) under an MLflow child.

Results live next to the fine-tuning runs of the same backbone
(``<backbone dir>/probe-<probe hash>/<dataset>/<probe>/seed<k>/``): ``per_image.json``, then
``metrics.json`` last, so a finished probe is read back and never re-run. Features are
computed once per trunk (once in all for given weights; once per seed for random init,
whose trunk the seed draws).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import DatasetInput
from omegaconf import DictConfig

from benchmark.config import probe_seeds
from benchmark.core.contracts import World
from benchmark.core.schema import DATASET_TITLES, PROBE_PER_IMAGE_FILE, PROBE_TITLES, PROBES
from benchmark.data.pretrain import PretrainImageDataset
from benchmark.lineage import coco_inputs, folder_input
from benchmark.probe import dense as dense_probe
from benchmark.probe import tissue
from benchmark.probe.features import build_trunk
from benchmark.probe.knn import knn_predict
from benchmark.probe.linear import classification_scores, linear_predict
from benchmark.report.statistics import seed_summary
from benchmark.tracking import NullTracker, Tracker, open_probe_run, run_status
from benchmark.training import checkpoints as ckpt
from benchmark.training.progress import main_printer

METRICS_FILE = "metrics.json"


def jobs(cfg: DictConfig) -> list[tuple[str, str]]:
    """The (dataset, probe) pairs ``cfg`` asks for, in table order."""
    wanted = set(cfg.probe.probes)
    return [
        (ds, probe)
        for ds, probe in PROBES
        if probe in wanted and (ds == "tissue" or ds in cfg.finetune.datasets)
    ]


def read_metrics(where: Path, ds: str, probe: str) -> dict[str, float] | None:
    """The scores of a finished (dataset, probe, seed) in ``where``, None when not scored
    yet. ``metrics.json`` present means finished, so one that does not parse or lacks a
    metric of its probe is a one-line ``CheckpointError`` saying to delete it (it was a
    traceback), raised before its run is touched."""
    path = Path(where) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # a bad UTF-8 byte is a ValueError too
        reason = f"cannot be read: {type(exc).__name__}"
    else:
        if not isinstance(metrics, dict):
            reason = f"holds a {type(metrics).__name__}, not the probe's scores"
        else:
            missing = [
                m
                for m in PROBES[(ds, probe)]
                if isinstance(metrics.get(m), bool) or not isinstance(metrics.get(m), int | float)
            ]
            if not missing:
                return metrics
            reason = f"has no {', '.join(missing)}"
    raise ckpt.CheckpointError(f"{path} is damaged ({reason}): delete it to re-run that probe")


def scored_probes(
    cfg: DictConfig, out_dir: Path
) -> dict[tuple[int, str, str], dict[str, float] | None]:
    """``read_metrics`` of every (seed, dataset, probe) of ``cfg`` under ``out_dir``, all
    before any probe runs: a damaged one stops the stage with nothing changed."""
    return {
        (seed, ds, probe): read_metrics(out_dir / ds / probe / f"seed{seed}", ds, probe)
        for seed in range(1, probe_seeds(cfg) + 1)
        for ds, probe in jobs(cfg)
    }


def aggregate(per_seed: dict[tuple[str, str], list[dict[str, float]]]) -> dict[str, float]:
    """``<dataset>_<probe>_<metric>_mean`` / ``_std`` (sample; 0 for one seed) /
    ``_ci_low`` / ``_ci_high`` (the report's interval, from two seeds on) and
    ``<dataset>_<probe>_seeds``."""
    out: dict[str, float] = {}
    for (ds, probe), runs in per_seed.items():
        if not runs:
            continue
        for metric in PROBES[(ds, probe)]:
            for stat, value in seed_summary([r[metric] for r in runs]).items():
                out[f"{ds}_{probe}_{metric}_{stat}"] = value
        out[f"{ds}_{probe}_seeds"] = float(len(runs))
    return out


class _Features:
    """Lazily computed features per (what, trunk seed); ``None`` seed for given weights."""

    def __init__(
        self,
        cfg: DictConfig,
        weights: Path | None,
        device: torch.device,
        gland_roots: dict[str, Path],
    ) -> None:
        self.cfg, self.weights, self.device = cfg, weights, device
        self.gland_roots = gland_roots
        self.cache: dict[tuple[str, int | None], Any] = {}

    def _trunk(self, seed: int | None) -> torch.nn.Module:
        return build_trunk(self.weights, seed or 0, self.device)

    def get(self, what: str, seed: int) -> Any:
        key = (what, None if self.weights is not None else seed)
        if key not in self.cache:
            # one trunk's features at a time: the random-init seeds would otherwise pile up
            self.cache = {k: v for k, v in self.cache.items() if k[1] == key[1]}
            trunk = self._trunk(key[1])
            if what == "tissue":
                seeds = [seed] if self.weights is None else range(1, probe_seeds(self.cfg) + 1)
                self.cache[key] = tissue.tissue_features(self.cfg, trunk, self.device, seeds)
            else:
                self.cache[key] = self._dense(what, trunk)
        return self.cache[key]

    def _dense(self, name: str, trunk: torch.nn.Module) -> dict[str, list]:
        from benchmark.data.coco import CocoInstances

        d = self.cfg.probe.dense
        extract = dense_probe.DenseFeatures(trunk, d.layers, d.size, d.max_size, self.device)
        root = self.gland_roots[name]
        out: dict[str, list] = {}
        for split in ("train", "test"):
            data = CocoInstances(root, split, train=False)
            out[split] = [(extract(image), dense_probe.gland_mask(t)) for image, t in data]
        return out


def _tissue(cfg: DictConfig, feats: tissue.TissueFeatures, probe: str, seed: int) -> dict:
    t = cfg.probe.tissue
    train, train_labels, drawn = feats.draw(t.train_per_class, seed)
    if probe == "knn":
        pred = knn_predict(
            train, train_labels, feats.test, len(feats.classes), t.knn_k, t.knn_temperature
        ).numpy()
    else:
        pred = linear_predict(
            train.numpy(), train_labels.numpy(), feats.test.numpy(), t.linear_c, t.linear_max_iter
        )
    truth = feats.test_labels.numpy()
    per_image = {
        "labels": truth.tolist(),
        "predictions": np.asarray(pred).astype(int).tolist(),
        "classes": feats.classes,
    }
    return {**classification_scores(truth, np.asarray(pred)), "train_images": drawn}, per_image


def _dense(cfg: DictConfig, feats: dict[str, list], seed: int) -> tuple[dict, dict]:
    d = cfg.probe.dense
    head, mean, std = dense_probe.train_dense_head(
        feats["train"], seed, d.iterations, d.batch_size, d.lr, d.weight_decay
    )
    dice, iou = dense_probe.score_dense_head(head, mean, std, feats["test"])
    metrics = {"dice": statistics.fmean(dice), "iou": statistics.fmean(iou)}
    return {**metrics, "train_images": len(feats["train"])}, {"dice": dice, "iou": iou}


def probe_inputs(cfg: DictConfig, ds: str, gland_roots: dict[str, Path]) -> list[DatasetInput]:
    """What a probe of ``ds`` trains and is tested on, as MLflow inputs: the labelled tissue
    folders, or the gland set's COCO train and test splits (those of the fine-tune)."""
    if ds != "tissue":
        return coco_inputs(
            DATASET_TITLES[ds], gland_roots[ds], cfg.profile, cfg.finetune[ds].synthetic
        )
    t = cfg.probe.tissue
    return [
        folder_input(root, PretrainImageDataset(root).paths, split, split, cfg.profile, t.synthetic)
        for root, split in ((t.train_root, "train"), (t.test_root, "test"))
    ]


def run_probes(
    cfg: DictConfig,
    world: World,
    weights: Path | None,
    out_dir: Path,
    tracker: Tracker | NullTracker,
    parent_id: str | None,
    gland_roots: dict[str, Path],
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Every probe of ``cfg.probe`` for ``weights`` (None: random init); returns the
    aggregates. Rank 0 computes; the other ranks return ``{}`` at once (probes are cheap and
    the caller's next stage waits at its own barrier)."""
    say = say or main_printer(world)
    if not world.is_main or not cfg.probe.probes:
        return {}
    wanted = jobs(cfg)
    scores = scored_probes(cfg, out_dir)
    if any(ds == "tissue" for ds, _ in wanted):
        if cfg.probe.tissue.synthetic:
            tissue.ensure_synthetic(cfg)
        tissue.check_roots(cfg)
    features = _Features(cfg, weights, world.device, gland_roots)
    per_seed: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in wanted}
    inputs: dict[str, list[DatasetInput]] = {}
    for seed in range(1, probe_seeds(cfg) + 1):
        for ds, probe in wanted:
            where = out_dir / ds / probe / f"seed{seed}"
            scored = scores[(seed, ds, probe)]
            child, done = open_probe_run(
                tracker, parent_id, cfg, ds, probe, seed, weights, scored is not None
            )
            if done and scored is not None:
                per_seed[(ds, probe)].append(scored)
                continue
            if ds not in inputs:
                inputs[ds] = probe_inputs(cfg, ds, gland_roots)
            tracker.log_inputs(child, inputs[ds])
            with run_status(tracker, child):
                if scored is not None:  # stopped after its metrics.json, before its run ended
                    metrics = scored
                    tracker.log_metrics(child, metrics, step=0)
                    per_seed[(ds, probe)].append(metrics)
                    continue
                start = time.perf_counter()
                if ds == "tissue":
                    metrics, per_image = _tissue(cfg, features.get("tissue", seed), probe, seed)
                else:
                    metrics, per_image = _dense(cfg, features.get(ds, seed), seed)
                metrics["time_s"] = time.perf_counter() - start
                where.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale_temps(where)  # what a kill inside the last writes left
                ckpt.save_json(per_image, where / PROBE_PER_IMAGE_FILE)
                tracker.log_artifact(child, where / PROBE_PER_IMAGE_FILE)
                tracker.log_metrics(child, metrics, step=0)
                ckpt.save_json(metrics, where / METRICS_FILE)
            shown = ", ".join(f"{PROBE_TITLES[m]} {metrics[m]:.1f}" for m in PROBES[(ds, probe)])
            say(f"==> probe {PROBE_TITLES[ds]} {PROBE_TITLES[probe]} seed {seed}: {shown}")
            per_seed[(ds, probe)].append(metrics)
    return aggregate(per_seed)
