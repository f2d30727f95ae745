"""Fine-tune Mask R-CNN R18-FPN on one dataset with one seed, then score it (concl_spec §4).

detectron2's "1x" recipe of the ConCL benchmark: SGD (momentum 0.9, weight decay 1e-4, none
on norm parameters), LR 0.02 at 16 images scaled linearly to the actual batch, linear
warm-up over 1000 iterations from 1e-3, steps x0.1, horizontal flips and shortest-edge
multi-scale training, precise-BN before the single evaluation at the end.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from benchmark.core.contracts import World
from benchmark.data.seeding import mix_seed
from benchmark.pretrain import TrainingDiverged
from benchmark.training import checkpoints as ckpt
from benchmark.training.distributed import barrier, seed_everything
from benchmark.training.progress import main_printer

FINETUNE_STREAM = 3
METRICS_FILE = "metrics.json"
_CKPT_PREFIX = "model_"


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


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.glob(f"{_CKPT_PREFIX}*.pth"):
        digits = p.stem.removeprefix(_CKPT_PREFIX)
        if digits.isdigit():
            found.append((int(digits), p))
    return sorted(found)


def _stream(loader: DataLoader, sampler: DistributedSampler, start_epoch: int) -> Iterator[Any]:
    """Iteration-based training over an epoch-based loader (GlaS has 85 images)."""
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def finetune(
    cfg: DictConfig,
    name: str,
    seed: int,
    weights: Path | None,
    world: World,
    out_dir: Path,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    stop_after_iter: int | None = None,
) -> FinetuneResult:
    """Train and evaluate one (dataset, seed); resumes from ``out_dir``'s newest checkpoint.

    ``on_log(metrics, iteration)`` receives the mean losses and LR every ``log_every``
    iterations on rank 0 (the caller sends them to MLflow in one batch).
    """
    from benchmark.data.coco import CocoInstances, collate
    from benchmark.transfer.evaluate import coco_ap, predict
    from benchmark.transfer.model import build_mask_rcnn, load_backbone, param_groups
    from benchmark.transfer.precise_bn import precise_bn

    if (out_dir / METRICS_FILE).is_file():
        import json

        return FinetuneResult(json.loads((out_dir / METRICS_FILE).read_text()), out_dir, True)
    f, d = cfg.finetune, cfg.finetune[name]
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
    net: nn.Module = model
    if world.is_distributed:
        if world.device.type == "cuda":  # SyncBN has no CPU kernel (peers.md §4)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=True,  # the mask head sees no RoI on some batches
        )
    if f.batch_size % world.world_size:
        from benchmark.config import ConfigError

        raise ConfigError(
            f"finetune.batch_size={f.batch_size} does not split over {world.world_size} processes"
        )
    base_lr = f.lr * f.batch_size / f.reference_batch
    optimizer = torch.optim.SGD(
        param_groups(model, f.weight_decay), lr=base_lr, momentum=f.momentum
    )

    start = 0
    found = _checkpoints(out_dir)
    if found:
        state = ckpt.load_checkpoint(found[-1][1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        say(f"==> finetune {name} seed {seed}: resuming from iteration {start}")

    train_set = CocoInstances(root, "train", train=True)
    local_batch = f.batch_size // world.world_size
    sampler = DistributedSampler(
        train_set, world.world_size, world.rank, shuffle=True, seed=seed, drop_last=True
    )
    loader = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=f.num_workers,
        collate_fn=collate,
        persistent_workers=f.num_workers > 0,
        pin_memory=world.device.type == "cuda",
        drop_last=True,
    )
    if len(loader) == 0:
        raise ValueError(
            f"{name}: {len(train_set)} training images are fewer than one batch of {local_batch}"
        )
    seed_everything(mix_seed(FINETUNE_STREAM, seed, world.rank + 1, start))
    stream = _stream(loader, sampler, start // len(loader))
    autocast = f.amp_bf16
    sums: dict[str, torch.Tensor] = {}
    tic, logged_at = time.perf_counter(), start
    net.train()
    last = d.iterations if stop_after_iter is None else min(d.iterations, stop_after_iter)
    for it in range(start, last):
        lr = detection_lr(it, base_lr, f.warmup_iters, f.warmup_factor, list(d.steps), f.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = next(stream)
        images = [img.to(world.device, non_blocking=True) for img in images]
        targets = [{k: _to(v, world.device) for k, v in t.items()} for t in targets]
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss_dict = net(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in {"loss": loss, **loss_dict}.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
        done = it + 1
        if done % f.log_every == 0 or done == last:
            n = done - logged_at
            means = {k: float(v) / n for k, v in sums.items()}
            if not math.isfinite(means["loss"]):
                raise TrainingDiverged(
                    f"{name} seed {seed}: loss is {means['loss']} at iteration {done}; "
                    "lower finetune.lr (checkpoints of earlier iterations are kept)"
                )
            rate = n * f.batch_size / (time.perf_counter() - tic)
            means.update({"lr": lr, "images_per_sec": rate})
            if world.is_main:
                say(
                    f"finetune {name} seed {seed} it {done}/{d.iterations} "
                    f"loss {means['loss']:.4f} lr {lr:.4g} {rate:.1f} img/s"
                )
                if on_log is not None:
                    on_log(means, done)
            sums, tic, logged_at = {}, time.perf_counter(), done
        if world.is_main and (done % f.checkpoint_every == 0 or done == last):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": done,
            }
            ckpt.save_torch(state, out_dir / f"{_CKPT_PREFIX}{done:07d}.pth")
    if last < d.iterations:
        barrier(world)
        return FinetuneResult({}, out_dir)

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
        say(
            f"==> finetune {name} seed {seed}: bbox AP {metrics['bbox_AP']:.1f}, "
            f"segm AP {metrics['segm_AP']:.1f}"
        )
    barrier(world)
    return FinetuneResult(metrics, out_dir)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
