"""The method-agnostic pre-training engine.

Owns what is the same for every method: DDP, SGD, the per-epoch LR schedule with optional
per-iteration warm-up, bf16 autocast, channels_last, per-epoch seeding (so a resumed run
continues bit-for-bit on CPU), atomic checkpoints, resume by config hash, tracking and
progress. The plugin owns its networks, views and loss (``methods.base.Method``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from benchmark.config import check_layout, flatten, pretrain_hash, to_container, to_yaml
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.errors import UserError
from benchmark.core.registry import get_method
from benchmark.data.seeding import (
    MODEL_STREAM,
    EpochTaggedSampler,
    IndexedSamples,
    SeededSamples,
    mix_seed,
)
from benchmark.training import checkpoints as ckpt
from benchmark.training.distributed import barrier, seed_everything
from benchmark.training.optim import build_optimizer
from benchmark.training.progress import Progress, main_printer
from benchmark.training.schedules import learning_rate, scaled_lr
from methods.base import Method

BACKBONE_FILE = "backbone.pth"
DONE_FILE = "done.json"


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


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


def build_method(cfg: DictConfig, world: World) -> Method:
    """The plugin for ``cfg.method``, built with the same initial weights on every rank."""
    method_cls = get_method(cfg.method.name)
    p = cfg.pretrain
    check_layout(cfg, world.world_size)
    local_batch = p.batch_size // world.world_size
    build = BuildContext(
        world=world,
        image_size=cfg.data.image_size,
        local_batch_size=local_batch,
        # BN cannot see more images than a process holds (no SyncBN in these methods).
        bn_batch_size=min(p.bn_batch_size, local_batch),
    )
    seed_everything(p.seed)
    method_cfg = method_cls.config_class(**to_container(cfg.method))
    return method_cls(method_cfg, build)


def build_loader(
    cfg: DictConfig, world: World, dataset: Dataset, with_index: bool = False
) -> DataLoader:
    """One loader for the whole run: call ``loader.sampler.set_epoch(e)`` before each epoch.

    Sampler order depends on (seed, epoch) and each sample's views on (seed, epoch, index),
    so workers persist across epochs and a resumed run sees exactly the same views.
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
        SeededSamples(dataset, cfg.pretrain.seed, with_index),
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


class Pretrainer:
    """One method's optimisation loop; usable on its own (tests, ``make bench``)."""

    def __init__(
        self,
        cfg: DictConfig,
        world: World,
        method: Method,
        steps_per_epoch: int,
        eval_dataset: Dataset | None = None,
    ):
        if steps_per_epoch < 1:
            raise ValueError(
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
        self.model: nn.Module = method
        if world.is_distributed and world.device.type == "cuda" and method.sync_bn:
            # SimCLR/BYOL normalise over the global batch (SyncBN); gloo cannot run it.
            nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if world.is_distributed:
            self.model = DistributedDataParallel(
                method,
                device_ids=[world.device.index] if world.device.type == "cuda" else None,
                broadcast_buffers=False,  # per-process BN statistics, as mmcv's DDP wrapper
                find_unused_parameters=method.find_unused_parameters,
            )
        o = cfg.optim
        self.lr = scaled_lr(o.lr, cfg.pretrain.batch_size, o.reference_batch, o.scale_lr)
        self.optimizer = build_optimizer(
            o.name, method.param_groups(), self.lr, o.momentum, o.weight_decay, o.trust_coefficient
        )
        self.autocast_dtype = torch.bfloat16 if cfg.pretrain.amp_bf16 else None

    def _to_device(self, views: Iterable[Tensor]) -> list[Tensor]:
        """Images (4-D) in the run's memory format; other tensors (e.g. crop boxes) as they are."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [
            v.to(self.world.device, non_blocking=True, memory_format=fmt)
            if v.dim() == 4
            else v.to(self.world.device, non_blocking=True)
            for v in views
        ]

    def train_epoch(
        self, loader: Iterable[Any], epoch: int, progress: Progress | None = None
    ) -> dict[str, float]:
        """One epoch; returns the epoch means of every loss term, plus lr and throughput."""
        cfg, world = self.cfg, self.world
        epochs = cfg.pretrain.epochs
        ctx = StepContext(epoch, epoch * self.steps_per_epoch, epochs, self.steps_per_epoch)
        self.method.train()
        self.method.on_epoch_start(ctx)
        pass_metrics = self.dataset_pass(ctx) if self.method.wants_dataset_pass(ctx) else {}
        sums: dict[str, Tensor] = {}
        steps = 0
        lr = self.lr
        start = time.perf_counter()
        for i, views in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            ctx = StepContext(epoch, epoch * self.steps_per_epoch + i, epochs, self.steps_per_epoch)
            lr = learning_rate(cfg.optim, self.lr, epochs, ctx.step, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            views = self._to_device(views)
            with torch.autocast(
                world.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                out = self.model(views, ctx)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.method.on_step_end(ctx)
            for key, value in out.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            steps += 1
            if progress is not None and (steps % cfg.pretrain.log_every == 0):
                loss_value = float(loss.detach())
                self._check_finite(loss_value, epoch, i)
                progress.step(steps, loss_value, lr)
            elif progress is not None:
                progress.step(steps, None, lr)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        elapsed = time.perf_counter() - start
        means = self._reduce_means(sums, steps)
        self._check_finite(means.get("loss", 0.0), epoch, steps - 1)
        means["lr"] = lr
        means["images_per_sec"] = steps * cfg.pretrain.batch_size / max(elapsed, 1e-9)
        means["epoch_time_s"] = elapsed
        return {**pass_metrics, **means}

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

    def _reduce_means(self, sums: dict[str, Tensor], steps: int) -> dict[str, float]:
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys]) / max(steps, 1)
        if self.world.is_distributed:
            dist.all_reduce(stacked)
            stacked /= self.world.world_size
        return dict(zip(keys, stacked.tolist(), strict=True))

    @staticmethod
    def _check_finite(value: float, epoch: int, step: int) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} at epoch {epoch + 1}, step {step + 1}: training diverged; "
                "lower optim.lr (checkpoints of earlier epochs are kept)"
            )

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


def _open_child(
    cfg: DictConfig, digest: str, world: World, start_epoch: int, parent: tuple[Any, str] | None
) -> tuple[Any, str | None, str | None]:
    """Rank 0: the pre-training child under the benchmark's parent (opened if not given)."""
    if not world.is_main:
        return None, None, None
    from benchmark.tracking import open_parent

    tracker, parent_id = parent if parent is not None else open_parent(cfg)
    child, created = tracker.child_run(
        parent_id,
        "pretrain",
        {"method": cfg.method.name, "pretrain_hash": digest},
        run_name=f"pretrain {cfg.method.name} ep{cfg.pretrain.epochs}",
    )
    if created:
        params = flatten({k: v for k, v in to_container(cfg).items() if k != "finetune"})
        params.update(
            {
                "world_size": world.world_size,
                "device": world.device.type,
                "lr_scaled": scaled_lr(
                    cfg.optim.lr,
                    cfg.pretrain.batch_size,
                    cfg.optim.reference_batch,
                    cfg.optim.scale_lr,
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
    return tracker, parent_id, child


def run_pretrain(
    cfg: DictConfig,
    world: World,
    stop_after_epoch: int | None = None,
    parent: tuple[Any, str] | None = None,
) -> PretrainResult:
    """Pre-train ``cfg.method``, resuming from the newest checkpoint of the same config.

    ``parent`` is the (tracker, run id) of a benchmark that owns the parent run; without
    it the parent is found or made here and closed with the pre-training's status.
    ``stop_after_epoch`` ends the run early as an interruption would (used to test resume).
    """
    from benchmark.data.pretrain import PretrainImageDataset

    digest = pretrain_hash(cfg)
    directory = ckpt.run_dir(cfg.output_root, cfg.method.name, digest)
    backbone_path = directory / BACKBONE_FILE
    say = main_printer(world)
    if (directory / DONE_FILE).is_file() and backbone_path.is_file():
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

    _ensure_data(cfg, world)
    method = build_method(cfg, world)
    dataset = PretrainImageDataset(cfg.data.root, cfg.data.list_file, transform=method.views())
    eval_dataset = PretrainImageDataset(
        cfg.data.root, cfg.data.list_file, transform=method.eval_view()
    )
    steps_per_epoch = len(dataset) // cfg.pretrain.batch_size
    trainer = Pretrainer(cfg, world, method, steps_per_epoch, eval_dataset)

    start_epoch = 0
    latest = ckpt.latest_checkpoint(directory)
    if latest is not None:
        state = ckpt.load_checkpoint(latest)
        if state.get("pretrain_hash") != digest:
            raise ckpt.CheckpointError(
                f"checkpoint {latest} belongs to config {state.get('pretrain_hash')}, "
                f"not {digest}; move it aside"
            )
        start_epoch = trainer.load_state_dict(state)
        say(
            f"==> pretrain: resuming {cfg.method.name} {digest} from {latest} (epoch {start_epoch})"
        )

    tracker, parent_id, run_id = _open_child(cfg, digest, world, start_epoch, parent)
    if world.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.yaml").write_text(to_yaml(cfg))
    say(
        f"==> pretrain: {cfg.method.name} {digest} | {len(dataset)} images, "
        f"{steps_per_epoch} steps/epoch, global batch {cfg.pretrain.batch_size} on "
        f"{world.world_size} x {world.device.type} | lr {trainer.lr:g} | run dir {directory}"
    )
    epoch = start_epoch
    status = "FAILED"
    try:
        loader = build_loader(cfg, world, dataset, method.wants_sample_index)
        for epoch in range(start_epoch, cfg.pretrain.epochs):
            # model-side randomness (e.g. shuffle-BN permutations): per (seed, epoch, rank)
            seed_everything(mix_seed(MODEL_STREAM, cfg.pretrain.seed, epoch, world.rank))
            loader.sampler.set_epoch(epoch)
            progress = Progress(
                world, epoch, cfg.pretrain.epochs, steps_per_epoch, cfg.pretrain.batch_size
            )
            try:
                metrics = trainer.train_epoch(loader, epoch, progress)
            finally:
                progress.close()
            done = epoch + 1
            if world.is_main:
                say(progress.summary(metrics))
                tracker.log_metrics(run_id, metrics, step=done)
                last = done == cfg.pretrain.epochs
                if last or done % cfg.pretrain.checkpoint_every == 0 or done == stop_after_epoch:
                    extra = {"pretrain_hash": digest, "mlflow_run_id": run_id}
                    ckpt.save_torch(
                        trainer.state_dict(done, extra), ckpt.checkpoint_path(directory, done)
                    )
            if (
                stop_after_epoch is not None
                and done >= stop_after_epoch
                and done < cfg.pretrain.epochs
            ):
                status = "KILLED"
                barrier(world)
                return PretrainResult(
                    directory, backbone_path, done, False, parent_id, run_id, method
                )
        if world.is_main:
            export_backbone(method, backbone_path)
            tracker.log_artifact(run_id, backbone_path)
            tracker.log_artifact(run_id, directory / "config.yaml")
            ckpt.save_json(
                {"pretrain_hash": digest, "epochs": cfg.pretrain.epochs, "mlflow_run_id": run_id},
                directory / DONE_FILE,
            )
            say(f"==> pretrain: done; backbone: {backbone_path}")
        status = "FINISHED"
        barrier(world)
        return PretrainResult(
            directory, backbone_path, cfg.pretrain.epochs, False, parent_id, run_id, method
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(run_id, status)
            if parent is None or status != "FINISHED":
                tracker.finish(parent_id, status)
