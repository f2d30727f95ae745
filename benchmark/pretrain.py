"""The pre-training stage: the method-agnostic engine around a method plugin.

Owns what is the same for every method: DDP, SGD/LARS, the per-epoch LR schedule with
optional per-iteration warm-up, per-epoch seeding (so a resumed run continues bit-for-bit on
CPU), resume by config hash, and the MLflow child run. The step itself (autocast, loss sums,
finite check, throughput, checkpoints, events) is the shared ``training.loop.TrainingLoop``.
The plugin owns its networks, views and loss (``methods.base.Method``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from benchmark.config import ConfigError, check_layout, method_config, pretrain_hash, to_yaml
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method
from benchmark.data.pretrain import PretrainImageDataset
from benchmark.data.seeding import (
    MODEL_STREAM,
    EpochTaggedSampler,
    IndexedSamples,
    SeededSamples,
    epoch_batches,
    mix_seed,
)
from benchmark.lineage import pretrain_input
from benchmark.registry import registered_name
from benchmark.system_metrics import system_metrics
from benchmark.tracking import (
    REGISTERED_MODEL_TAG,
    MlflowMetrics,
    ParentRun,
    Tracker,
    open_parent,
    open_pretrain_run,
    run_status,
)
from benchmark.training import checkpoints as ckpt
from benchmark.training.distributed import barrier, seed_everything, wrap_ddp
from benchmark.training.loop import Callback, TrainingDiverged, TrainingLoop
from benchmark.training.optim import build_optimizer
from benchmark.training.progress import Progress, main_printer
from benchmark.training.schedules import learning_rate, scaled_lr
from methods.base import Method

__all__ = ["PretrainResult", "Pretrainer", "TrainingDiverged", "build_method", "run_pretrain"]

BACKBONE_FILE = "backbone.pth"
DONE_FILE = "done.json"


@dataclass
class PretrainResult:
    run_dir: Path
    backbone_path: Path
    epochs_done: int
    already_finished: bool = False
    parent_run_id: str | None = None
    run_id: str | None = None
    #: The trained plugin (None when the run had already finished).
    method: Method | None = None


def build_method(cfg: DictConfig, world: World, num_classes: int | None = None) -> Method:
    """The plugin for ``cfg.method``, built with the same initial weights on every rank.

    ``num_classes`` (the dataset's class folders) reaches only methods that want labels;
    the others get the context they always got.
    """
    method_cls = get_method(cfg.method.name)
    p = cfg.pretrain
    check_layout(cfg, world.world_size)
    local_batch = p.batch_size // world.world_size
    if method_cls.wants_labels and num_classes is None:
        raise ValueError(f"method {cfg.method.name!r} trains on labels: pass num_classes")
    build = BuildContext(
        world=world,
        image_size=cfg.data.image_size,
        local_batch_size=local_batch,
        # BN cannot see more images than a process holds (no SyncBN in these methods).
        bn_batch_size=min(p.bn_batch_size, local_batch),
        num_classes=num_classes if method_cls.wants_labels else None,
    )
    seed_everything(p.seed)
    return method_cls(method_config(cfg), build)


def build_loader(
    cfg: DictConfig,
    world: World,
    dataset: Dataset,
    with_index: bool = False,
    with_label: bool = False,
) -> DataLoader:
    """One loader for the whole run: call ``loader.sampler.set_epoch(e)`` before each epoch.

    Sampler order depends on (seed, epoch) and each sample's views on (seed, epoch, index),
    so workers persist across epochs and a resumed run sees exactly the same views. Batches
    are the views, then the indices (``with_index``), then the class labels (``with_label``).
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=world.world_size,
        rank=world.rank,
        shuffle=True,
        seed=cfg.pretrain.seed,
        drop_last=True,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        SeededSamples(dataset, cfg.pretrain.seed, with_index, with_label),
        batch_size=cfg.pretrain.batch_size // world.world_size,
        sampler=EpochTaggedSampler(sampler),
        num_workers=workers,
        pin_memory=world.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def build_eval_loader(cfg: DictConfig, world: World, dataset: Dataset) -> DataLoader:
    """This process's share of every sample, in order, as ``(indices, images)`` batches.

    ``DistributedSampler`` pads the last share with repeated samples so every process runs
    the same number of batches; a repeated index carries the same image, so gathering by
    index is unaffected.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world.world_size, rank=world.rank, shuffle=False, drop_last=False
    )
    return DataLoader(
        IndexedSamples(dataset),
        batch_size=cfg.pretrain.batch_size // world.world_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=world.device.type == "cuda",
    )


class _EpochProgress(Callback):
    """Feeds one epoch's ``Progress`` from the loop's step events."""

    def __init__(self, progress: Progress, first_step: int) -> None:
        self.progress, self.first_step = progress, first_step

    def on_step_end(self, step: int, loss: float | None, lr: float) -> None:
        self.progress.step(step - self.first_step + 1, loss, lr)


class Pretrainer:
    """One method's optimisation loop; usable on its own (tests, ``make bench``)."""

    def __init__(
        self,
        cfg: DictConfig,
        world: World,
        method: Method,
        steps_per_epoch: int,
        eval_dataset: Dataset | None = None,
        checkpoints: ckpt.CheckpointManager | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        if steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch has no full batch of {cfg.pretrain.batch_size} images: the dataset "
                "is smaller than the global batch; lower pretrain.batch_size or add images"
            )
        self.cfg, self.world, self.method = cfg, world, method
        self.steps_per_epoch = steps_per_epoch
        #: The training images under ``method.eval_view()``, for methods that need a pass.
        self.eval_dataset = eval_dataset
        self.channels_last = cfg.pretrain.channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        method.to(device=world.device, memory_format=memory_format)
        # SimCLR/BYOL normalise over the global batch (SyncBN); per-process BN statistics
        # otherwise, as mmcv's DDP wrapper (no buffer broadcast).
        self.model: nn.Module = wrap_ddp(
            method,
            world,
            sync_bn=method.sync_bn,
            find_unused_parameters=method.find_unused_parameters,
            broadcast_buffers=False,
        )
        o = cfg.optim
        self.lr = scaled_lr(o.lr, cfg.pretrain.batch_size, o.reference_batch, o.scale_lr)
        self.optimizer = build_optimizer(
            o.name, method.param_groups(), self.lr, o.momentum, o.weight_decay, o.trust_coefficient
        )
        epochs = cfg.pretrain.epochs
        self.loop = TrainingLoop(
            world,
            self.model,
            self.optimizer,
            lambda step: learning_rate(o, self.lr, epochs, step, steps_per_epoch),
            global_batch=cfg.pretrain.batch_size,
            log_every=cfg.pretrain.log_every,
            diverged=self._diverged,
            amp_bf16=cfg.pretrain.amp_bf16,
            after_step=lambda step: method.on_step_end(self._ctx(step)),
            checkpoints=checkpoints,
            callbacks=callbacks,
        )

    def _ctx(self, step: int) -> StepContext:
        spe = self.steps_per_epoch
        return StepContext(step // spe, step, self.cfg.pretrain.epochs, spe)

    def _diverged(self, value: float, step: int) -> str:
        epoch, i = divmod(step, self.steps_per_epoch)
        return (
            f"loss is {value} at epoch {epoch + 1}, step {i + 1}: training diverged; "
            "lower optim.lr (checkpoints of earlier epochs are kept)"
        )

    def _to_device(self, views: Iterable[Tensor]) -> list[Tensor]:
        """Images (4-D) in the run's memory format; other tensors (e.g. crop boxes) as they are."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [
            v.to(self.world.device, non_blocking=True, memory_format=fmt)
            if v.dim() == 4
            else v.to(self.world.device, non_blocking=True)
            for v in views
        ]

    def _forward(self, views: Iterable[Tensor], step: int) -> dict[str, Tensor]:
        return self.model(self._to_device(views), self._ctx(step))

    def train_epoch(
        self, loader: Iterable[Any], epoch: int, progress: Progress | None = None
    ) -> dict[str, float]:
        """One epoch; returns the epoch means of every loss term, plus lr and throughput."""
        first = epoch * self.steps_per_epoch
        ctx = self._ctx(first)
        self.method.train()
        self.method.on_epoch_start(ctx)
        pass_metrics = self.dataset_pass(ctx) if self.method.wants_dataset_pass(ctx) else {}
        events = self.loop.events.callbacks
        feed = _EpochProgress(progress, first) if progress is not None else None
        if feed is not None:
            events.append(feed)
        try:
            means = self.loop.run(
                loader,
                range(first, first + self.steps_per_epoch),
                self._forward,
                extra_metrics=lambda elapsed: {"epoch_time_s": elapsed},
            )
        finally:
            if feed is not None:
                events.remove(feed)
        metrics = {**pass_metrics, **means}
        self.loop.events.on_epoch_end(metrics, epoch + 1)
        return metrics

    def dataset_pass(self, ctx: StepContext) -> dict[str, float]:
        """Hand the method this process's share of the training set (un-augmented)."""
        if self.eval_dataset is None:
            raise RuntimeError(f"{self.method.name} needs a dataset pass but has no eval dataset")
        start = time.perf_counter()
        loader = build_eval_loader(self.cfg, self.world, self.eval_dataset)
        device = self.world.device
        batches = (
            (idx.to(device, non_blocking=True), img.to(device, non_blocking=True))
            for idx, img in loader
        )
        metrics = self.method.on_dataset_pass(batches, len(self.eval_dataset), ctx)
        self.method.train()
        return {**metrics, "dataset_pass_time_s": time.perf_counter() - start}

    def state_dict(self, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"])


def export_backbone(method: Method, path: Path) -> None:
    """Save the online/query encoder as a torchvision ResNet ``state_dict`` (no ``fc``)."""
    state = {k: v.detach().cpu().clone() for k, v in method.backbone().state_dict().items()}
    ckpt.save_torch(state, path)


def _ensure_data(cfg: DictConfig, world: World) -> None:
    """Generate the synthetic set on first use (demo profile); other ranks wait for it."""
    d = cfg.data
    if d.synthetic and world.is_main:
        from benchmark.data.synthetic import is_complete, write_pretrain_set

        root = Path(d.root)
        if not is_complete(root, d.synthetic_images, d.synthetic_size, d.synthetic_seed):
            print(
                f"==> generating {d.synthetic_images} synthetic H&E patches in {root} (first run)",
                file=sys.stderr,
                flush=True,
            )
        write_pretrain_set(
            root,
            d.synthetic_images,
            d.synthetic_size,
            d.synthetic_seed,
            list_file=d.list_file or "train.txt",
        )
    barrier(world)


def run_pretrain(
    cfg: DictConfig,
    world: World,
    parent: ParentRun | None = None,
    stop_after_epoch: int | None = None,
) -> PretrainResult:
    """Pre-train ``cfg.method``, resuming from the newest checkpoint of the same config.

    ``parent`` is the run of a benchmark that owns the parent run; without
    it the parent is found or made here and closed with the pre-training's status.
    ``stop_after_epoch`` ends the run early as an interruption would (used to test resume).
    A finished run (``done.json``) is reused only while its backbone is the one it exported;
    a damaged backbone is exported again from the last epoch's checkpoint.
    The run folder and its ``config.yaml`` are written before any run is marked RUNNING, so
    an unwritable ``output_root`` is one line and leaves every run's status as it was;
    ``done.json`` is written once those runs have ended, so a kill in between leaves no run
    RUNNING for good (the re-run exports the backbone again from the last checkpoint).
    """
    digest = pretrain_hash(cfg)
    directory = ckpt.run_dir(cfg.output_root, cfg.method.name, digest)
    backbone_path = directory / BACKBONE_FILE
    say = main_printer(world)
    if _finished(cfg, directory, say):
        if parent is not None or not world.is_main:
            say(f"==> pretrain: reusing the finished pre-training {digest}: {backbone_path}")
        else:
            say(
                f"==> pretrain: {cfg.method.name} config {digest} already finished "
                f"({cfg.pretrain.epochs} epochs); backbone: {backbone_path}. Nothing to do: "
                "the number of processes is not part of the config; change EPOCHS or a "
                "config key for a new run."
            )
        return PretrainResult(directory, backbone_path, cfg.pretrain.epochs, already_finished=True)
    if world.is_main:
        ckpt.make_writable_folder(directory, cfg.output_root)
        config = to_yaml(cfg)
        ckpt.atomic_write(directory / "config.yaml", lambda tmp: Path(tmp).write_text(config))
    if parent is not None:
        result = _pretrain(cfg, world, stop_after_epoch, parent.tracker, parent.run_id)
    else:
        tracker, parent_id = open_parent(cfg, world=world)
        with run_status(tracker, parent_id) as outcome:
            result = _pretrain(cfg, world, stop_after_epoch, tracker, parent_id)
            if result.epochs_done < cfg.pretrain.epochs:
                outcome.stopped()
    if world.is_main and result.epochs_done == cfg.pretrain.epochs:
        record = _done_record(digest, cfg.pretrain.epochs, result.run_id, backbone_path)
        ckpt.save_json(record, directory / DONE_FILE)
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _done_record(digest: str, epochs: int, run_id: str | None, backbone: Path) -> dict[str, Any]:
    """What ``done.json`` holds: the run, and the size and sha256 of the exported backbone so
    that a later reuse can tell the file it wrote from a truncated or replaced one."""
    return {
        "pretrain_hash": digest,
        "epochs": epochs,
        "mlflow_run_id": run_id,
        "backbone_bytes": backbone.stat().st_size,
        "backbone_sha256": _sha256(backbone),
    }


def _backbone_problem(done: Path, backbone: Path) -> str | None:
    """Why the finished run's backbone cannot be reused, or None when it can.

    The size is checked always and the sha256 (~45 MB to read, well under a second) where
    ``done.json`` records one; a ``done.json`` written before it recorded them is accepted
    when the backbone is non-empty and loads.
    """
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError) as exc:
        return f"{done} cannot be read ({type(exc).__name__})"
    if not isinstance(record, dict):
        return f"{done} is damaged (not a JSON object)"
    if not backbone.is_file():
        return f"backbone {backbone} is missing"
    size = backbone.stat().st_size
    expected = record.get("backbone_bytes")
    if size == 0 or (expected is not None and size != expected):
        return f"backbone {backbone} is damaged ({size} bytes, {expected or 'more'} when written)"
    if "backbone_sha256" in record:
        if _sha256(backbone) != record["backbone_sha256"]:
            return f"backbone {backbone} is damaged (its sha256 is not the one in {done})"
        return None
    try:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as exc:
        return f"backbone {backbone} cannot be read ({type(exc).__name__})"
    if not isinstance(state, dict) or not state:
        return f"backbone {backbone} is damaged (not a state dict)"
    return None


def _finished(cfg: DictConfig, directory: Path, say: Any) -> bool:
    """True when the run finished and its backbone is intact. A damaged one is exported
    again from the last epoch's checkpoint when that is there (False: the caller resumes
    from it, trains no epoch and exports); otherwise a ``CheckpointError`` says what to do."""
    done, backbone = directory / DONE_FILE, directory / BACKBONE_FILE
    if not done.is_file():
        return False
    problem = _backbone_problem(done, backbone)
    if problem is None:
        return True
    epochs = cfg.pretrain.epochs
    found = ckpt.CheckpointManager(directory, "epoch", writer=False).found()
    final = [p for n, p in found if n == epochs]
    if final:
        say(f"==> pretrain: {problem}; exporting it again from {final[-1]}")
        return False
    if found:
        newest, path = found[-1]
        todo = f"to resume from {path.name} (epoch {newest} of {epochs})"
    else:
        todo = "to train it again (no checkpoint is left)"
    raise ckpt.CheckpointError(
        f"{problem} and the checkpoint of epoch {epochs} is gone: delete {done} and "
        f"{backbone} {todo}, or delete the run folder {directory} to re-train"
    )


def _pretrain(
    cfg: DictConfig,
    world: World,
    stop_after_epoch: int | None,
    tracker: Tracker,
    parent_id: str | None,
) -> PretrainResult:
    digest = pretrain_hash(cfg)
    directory = ckpt.run_dir(cfg.output_root, cfg.method.name, digest)
    backbone_path = directory / BACKBONE_FILE
    say = main_printer(world)
    _ensure_data(cfg, world)
    # The dataset first: a method that trains on labels is sized by its class folders.
    dataset = PretrainImageDataset(cfg.data.root, cfg.data.list_file)
    if len(dataset) < cfg.pretrain.batch_size:
        raise ConfigError(
            f"pretrain.batch_size={cfg.pretrain.batch_size} is larger than the {len(dataset)} "
            f"pre-training images in {cfg.data.root}: lower pretrain.batch_size to at most "
            f"{len(dataset)} or add images"
        )
    wants_labels = get_method(cfg.method.name).wants_labels
    method = build_method(cfg, world, len(dataset.classes) if wants_labels else None)
    dataset.transform = method.views()
    eval_dataset = PretrainImageDataset(
        cfg.data.root, cfg.data.list_file, transform=method.eval_view()
    )
    steps_per_epoch = len(dataset) // cfg.pretrain.batch_size
    checkpoints = ckpt.CheckpointManager(directory, "epoch", writer=world.is_main)
    trainer = Pretrainer(cfg, world, method, steps_per_epoch, eval_dataset, checkpoints)

    start_epoch = 0
    latest = checkpoints.latest()
    if latest is not None:
        state = ckpt.load_checkpoint(latest, ("epoch", "model", "optimizer"))
        if state.get("pretrain_hash") != digest:
            raise ckpt.CheckpointError(
                f"checkpoint {latest} belongs to config {state.get('pretrain_hash')}, "
                f"not {digest}; move it aside"
            )
        start_epoch = trainer.load_state_dict(state)
        say(
            f"==> pretrain: resuming {cfg.method.name} {digest} from {latest} (epoch {start_epoch})"
        )

    # the run folder and config.yaml are written (run_pretrain): from the moment the child
    # is RUNNING, everything is inside its status guard
    run_id = open_pretrain_run(tracker, parent_id, cfg, world, start_epoch)
    epochs, every = cfg.pretrain.epochs, cfg.pretrain.checkpoint_every
    with (
        run_status(tracker, run_id) as outcome,
        system_metrics(tracker.uri, run_id, cfg, world.device),
    ):
        if world.is_main:
            data = [pretrain_input(dataset.root, dataset.paths, cfg.profile, cfg.data.synthetic)]
            tracker.log_inputs(run_id, data)
            tracker.log_inputs(parent_id, data)
        trainer.loop.events.callbacks.append(MlflowMetrics(tracker, run_id, per_epoch=True))
        say(
            f"==> pretrain: {cfg.method.name} {digest} | {len(dataset)} images, "
            f"{steps_per_epoch} steps/epoch, global batch {cfg.pretrain.batch_size} on "
            f"{world.world_size} x {world.device.type} | lr {trainer.lr:g} | run dir {directory}"
        )
        loader = build_loader(cfg, world, dataset, method.wants_sample_index, method.wants_labels)
        for epoch in range(start_epoch, epochs):
            # model-side randomness (e.g. shuffle-BN permutations): per (seed, epoch, rank)
            seed_everything(mix_seed(MODEL_STREAM, cfg.pretrain.seed, epoch, world.rank))
            loader.sampler.set_epoch(epoch)
            progress = Progress(world, epoch, epochs, steps_per_epoch, cfg.pretrain.batch_size)
            try:
                # the loader's seed draw stays off the model stream after epoch 0, so a
                # resumed run and any num_workers train alike
                batches = epoch_batches(loader, epoch)
                metrics = trainer.train_epoch(batches, epoch, progress)
            finally:
                progress.close()
            done = epoch + 1
            say(progress.summary(metrics))
            if done in (epochs, stop_after_epoch) or done % every == 0:
                extra = {"pretrain_hash": digest, "mlflow_run_id": run_id}
                trainer.loop.save_checkpoint(done, trainer.state_dict(done, extra))
            if stop_after_epoch is not None and stop_after_epoch <= done < epochs:
                outcome.stopped()
                barrier(world)
                return PretrainResult(
                    directory, backbone_path, done, False, parent_id, run_id, method
                )
        if world.is_main:
            export_backbone(method, backbone_path)
            tracker.log_artifact(run_id, backbone_path)
            tracker.log_artifact(run_id, directory / "config.yaml")
            name = registered_name(cfg.method.name, epochs, cfg.profile)
            version = tracker.register_backbone(
                run_id, backbone_path, name, {"method": cfg.method.name, "pretrain_hash": digest}
            )
            if version is not None:
                tracker.set_tags(parent_id, {REGISTERED_MODEL_TAG: f"{name}/{version}"})
                say(f"==> pretrain: registered the backbone as models:/{name}/{version}")
        trainer.loop.events.on_done({})
        say(f"==> pretrain: done; backbone: {backbone_path}")
        barrier(world)
        return PretrainResult(directory, backbone_path, epochs, False, parent_id, run_id, method)
