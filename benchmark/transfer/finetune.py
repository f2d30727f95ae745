"""Fine-tune Mask R-CNN R18-FPN on one dataset with one seed, then score it.

detectron2's "1x" recipe of the ConCL benchmark (TencentAILabHealthcare/ConCL
``benchmarks/detection/configs/GlaS/GlaS_R_18_FPN_1x.yaml`` and ``Base-RCNN-FPN.yaml``, with
facebookresearch/detectron2 ``detectron2/config/defaults.py`` for what they leave unset): SGD
(momentum 0.9, weight decay 1e-4, none on norm parameters), LR 0.02 at 16 images scaled
linearly to the actual batch, linear warm-up over 1000 iterations from 1e-3, steps x0.1,
horizontal flips and shortest-edge multi-scale training, precise-BN (200 iterations) before
the single evaluation at the end (``TEST.EVAL_PERIOD`` unset). The optimisation loop is the
shared ``training.loop.TrainingLoop``.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from benchmark.config import ConfigError
from benchmark.core.contracts import World
from benchmark.data.seeding import (
    FINETUNE_DATA_STREAM,
    FINETUNE_STREAM,
    EpochTaggedSampler,
    SeededSamples,
    mix_seed,
)
from benchmark.training import checkpoints as ckpt
from benchmark.training.checkpoints import CheckpointManager
from benchmark.training.distributed import barrier, seed_everything, wrap_ddp
from benchmark.training.loop import WINDOW_KEY, Callback, TrainingLoop
from benchmark.training.progress import main_printer

METRICS_FILE = "metrics.json"


@dataclass
class FinetuneResult:
    metrics: dict[str, float]
    out_dir: Path
    already_done: bool = False


def detection_lr(
    iteration: int,
    lr: float,
    warmup_iters: int,
    warmup_factor: float,
    steps: list[int] | tuple[int, ...],
    gamma: float,
) -> float:
    """detectron2's ``WarmupMultiStepLR``: linear warm-up, then x``gamma`` at each step."""
    factor = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    return lr * factor * gamma ** bisect.bisect_right(list(steps), iteration)


def prepare_dataset_for(cfg: DictConfig, name: str, world: World) -> Path:
    """The COCO folder of ``name``, generating synthetic raw data first in the demo."""
    from benchmark.data.coco import prepare_dataset

    d = cfg.finetune[name]
    raw, out = Path(d.raw_root), Path(d.root)
    if world.is_main:
        if d.synthetic:
            from benchmark.data import glands

            write = glands.write_glas_raw if name == "glas" else glands.write_crag_raw
            if name == "glas":
                kwargs = {
                    "num_train": d.synthetic_train,
                    "num_test_a": d.synthetic_test,
                    "num_test_b": 0,
                }
            else:
                kwargs = {"num_train": d.synthetic_train, "num_valid": d.synthetic_test}
            write(raw, height=d.synthetic_height, width=d.synthetic_width, seed=0, **kwargs)
        root = prepare_dataset(name, raw, out)
    barrier(world)
    if not world.is_main:
        root = prepare_dataset(name, raw, out)  # finds the finished conversion
    return root


def _stream(loader: DataLoader, sampler: EpochTaggedSampler, start: int) -> Iterator[Any]:
    """Iteration-based training over an epoch-based loader (GlaS has 85 images), from
    iteration ``start`` on.

    Iteration ``it`` gets batch ``it % n`` of epoch ``it // n`` (``n`` batches an epoch, the
    epoch's order keyed by (seed, epoch)), so a run resumed in the middle of an epoch skips
    the batches already trained, without loading them, and continues as an uninterrupted run.
    """
    per_epoch = len(sampler.sampler) // loader.batch_size  # drop_last
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


def _seed_step(seed: int, world: World, iteration: int) -> None:
    """Model-side randomness of one iteration (RPN/RoI sampling, the random training size):
    keyed by (seed, rank, iteration), so a resumed run draws what an uninterrupted one does."""
    seed_everything(mix_seed(FINETUNE_STREAM, seed, world.rank + 1, iteration))


def finetune(
    cfg: DictConfig,
    name: str,
    seed: int,
    weights: Path | None,
    world: World,
    out_dir: Path,
    callbacks: Sequence[Callback] = (),
    stop_after_iter: int | None = None,
) -> FinetuneResult:
    """Train and evaluate one (dataset, seed); resumes from ``out_dir``'s newest checkpoint.

    ``callbacks`` get the training loop's events: ``on_log`` every ``log_every`` iterations
    with the losses averaged over the window and over processes, ``on_done`` with the COCO
    metrics (the MLflow layer subscribes; off rank 0 its tracker does nothing).

    A resumed run continues exactly as an uninterrupted one (see ``_stream`` and
    ``_seed_step``). ``metrics.json`` marks the (dataset, seed) done; once it is written the
    iteration checkpoints but the newest are deleted (181 MB each at the paper's size): the
    newest is enough to score it again, after deleting ``metrics.json``.
    """
    from benchmark.data.coco import CocoInstances, collate
    from benchmark.transfer.evaluate import coco_ap, predict
    from benchmark.transfer.model import build_mask_rcnn, load_backbone, param_groups
    from benchmark.transfer.precise_bn import precise_bn

    scored = read_metrics(out_dir)
    if scored is not None:
        if world.is_main:  # a kill between metrics.json and the pruning left them all
            CheckpointManager(out_dir, "iter").prune(keep=1)
        return FinetuneResult(scored, out_dir, True)
    f, d = cfg.finetune, cfg.finetune[name]
    if f.batch_size % world.world_size:
        raise ConfigError(
            f"finetune.batch_size={f.batch_size} does not split over {world.world_size} processes"
        )
    if world.is_main:  # before hours of training, not at the first checkpoint
        ckpt.make_writable_folder(out_dir, cfg.output_root)
    root = prepare_dataset_for(cfg, name, world)
    say = main_printer(world)

    seed_everything(mix_seed(FINETUNE_STREAM, seed, 0))  # same initial heads on every rank
    model = build_mask_rcnn(
        min_size_train=(d.min_size_train[0], d.min_size_train[1]),
        min_size_test=d.min_size_test,
        max_size=d.max_size,
        rpn_pre_nms_top_n_train=f.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=f.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=f.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=f.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=f.rpn_batch_size_per_image,
        box_batch_size_per_image=f.box_batch_size_per_image,
    )
    if weights is not None:
        load_backbone(model, weights)
    model.to(world.device)
    # Real BN in backbone and FPN, synchronised across GPUs; the mask head sees no RoI on
    # some batches, hence find_unused_parameters.
    net = wrap_ddp(model, world, sync_bn=True, find_unused_parameters=True)
    base_lr = f.lr * f.batch_size / f.reference_batch
    optimizer = torch.optim.SGD(
        param_groups(model, f.weight_decay), lr=base_lr, momentum=f.momentum
    )

    checkpoints = CheckpointManager(out_dir, "iter", writer=world.is_main)
    start = 0
    open_window = None  # the logging window a checkpoint was written in the middle of
    latest = checkpoints.latest()
    if latest is not None:
        saved = ckpt.load_checkpoint(latest, ("model", "optimizer", "iteration"))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = int(saved["iteration"])
        open_window = saved.get(WINDOW_KEY)
        say(f"==> finetune {name} seed {seed}: resuming from iteration {start}")

    train_set = CocoInstances(root, "train", train=True)
    local_batch = f.batch_size // world.world_size
    sampler = EpochTaggedSampler(
        DistributedSampler(
            train_set, world.world_size, world.rank, shuffle=True, seed=seed, drop_last=True
        )
    )
    # flips keyed by (seed, epoch, index), whichever worker loads the image
    loader = DataLoader(
        SeededSamples(train_set, seed, stream=FINETUNE_DATA_STREAM),
        batch_size=local_batch,
        sampler=sampler,
        num_workers=f.num_workers,
        collate_fn=collate,
        persistent_workers=f.num_workers > 0,
        pin_memory=world.device.type == "cuda",
        drop_last=True,
    )
    if len(loader) == 0:
        most = len(train_set) // world.world_size * world.world_size
        raise ConfigError(
            f"finetune.batch_size={f.batch_size} is larger than the {len(train_set)} {name} "
            f"training images with glands: lower finetune.batch_size to at most {most}"
        )
    stream = _stream(loader, sampler, start)

    def forward(batch: Any, step: int) -> dict[str, torch.Tensor]:
        _seed_step(seed, world, step)
        images, targets = batch
        images = [img.to(world.device, non_blocking=True) for img in images]
        targets = [{k: _to(v, world.device) for k, v in t.items()} for t in targets]
        loss_dict = net(images, targets)
        return {"loss": sum(loss_dict.values()), **loss_dict}

    def diverged(value: float, step: int) -> str:
        return (
            f"{name} seed {seed}: loss is {value} at iteration {step + 1}; "
            "lower finetune.lr (checkpoints of earlier iterations are kept)"
        )

    def state(done: int) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": done}

    lines = _LogLines(say, f"finetune {name} seed {seed}", d.iterations)
    loop = TrainingLoop(
        world,
        net,
        optimizer,
        lambda it: detection_lr(
            it, base_lr, f.warmup_iters, f.warmup_factor, list(d.steps), f.gamma
        ),
        global_batch=f.batch_size,
        log_every=f.log_every,
        diverged=diverged,
        amp_bf16=f.amp_bf16,
        checkpoints=checkpoints,
        callbacks=[lines, *callbacks],
    )
    net.train()
    last = d.iterations if stop_after_iter is None else min(d.iterations, stop_after_iter)
    loop.run(
        stream,
        range(start, last),
        forward,
        window=f.log_every,
        checkpoint_every=f.checkpoint_every,
        state=state,
        resume_window=open_window,
        close_at_stop=last == d.iterations,  # stopped early: no partial window, as a kill
    )
    if last < d.iterations:
        barrier(world)
        return FinetuneResult({}, out_dir)

    _seed_step(seed, world, d.iterations)  # precise BN continues the stream after training
    used = precise_bn(model, stream, f.precise_bn_iters)
    metrics: dict[str, float] = {}
    if world.is_main:
        test_set = CocoInstances(root, "test", train=False)
        test_loader = DataLoader(
            test_set,
            batch_size=f.eval_batch_size,
            num_workers=min(f.num_workers, 2),
            collate_fn=collate,
        )
        start_eval = time.perf_counter()
        results = predict(model, test_loader, world.device)
        metrics = coco_ap(test_set.coco, results)
        metrics["eval_time_s"] = time.perf_counter() - start_eval
        metrics["precise_bn_batches"] = float(used)
        ckpt.save_json(metrics, out_dir / METRICS_FILE)
        checkpoints.prune(keep=1)
        say(
            f"==> finetune {name} seed {seed}: bbox AP {metrics['bbox_AP']:.1f}, "
            f"segm AP {metrics['segm_AP']:.1f}"
        )
    loop.events.on_done(metrics)
    barrier(world)
    return FinetuneResult(metrics, out_dir)


def read_metrics(out_dir: Path) -> dict[str, float] | None:
    """The COCO metrics of a finished (dataset, seed), None when it is not scored yet.

    ``metrics.json`` present means finished; one that does not parse or has no ``bbox_AP``
    is a ``CheckpointError`` saying how to score it again.
    """
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = f"cannot be read ({type(exc).__name__})"
    else:
        if isinstance(metrics, dict) and isinstance(metrics.get("bbox_AP"), int | float):
            return metrics
        reason = "has no bbox_AP"
    raise ckpt.CheckpointError(
        f"{path} {reason}: delete it to score this fine-tune again from its newest checkpoint"
    )


class _LogLines(Callback):
    """One progress line per logging window (rank 0)."""

    def __init__(self, say: Callable[[str], None], what: str, iterations: int) -> None:
        self.say, self.what, self.iterations = say, what, iterations

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.say(
            f"{self.what} it {step}/{self.iterations} loss {metrics['loss']:.4f} "
            f"lr {metrics['lr']:.4g} {metrics['images_per_sec']:.1f} img/s"
        )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
