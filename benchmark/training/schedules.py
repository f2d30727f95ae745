"""Learning-rate schedules of the original (mmcv ``LrUpdaterHook``), as pure functions.

mmcv steps cosine and step decay once per *epoch* (``by_epoch=True``) and warm-up once per
*iteration*; keeping them pure makes them easy to check by hand and to resume exactly.
"""

from __future__ import annotations

import bisect
import math

from omegaconf import DictConfig


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, scale: bool = True) -> float:
    """Linear scaling rule: the LR grows with the global batch (Goyal et al., 2017)."""
    return base_lr * global_batch / reference_batch if scale else base_lr


def epoch_lr(
    lr: float,
    epoch: int,
    epochs: int,
    schedule: str,
    milestones: list[int] | tuple[int, ...] = (),
    gamma: float = 0.1,
) -> float:
    """LR for the 0-based ``epoch``: cosine annealing to 0 or step decay."""
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return lr * gamma ** bisect.bisect_right(list(milestones), epoch)
    raise ValueError(f"unknown LR schedule {schedule!r}; use cosine or step")


def warmup_factor(iteration: int, warmup_iters: int, ratio: float) -> float:
    """mmcv linear warm-up: from ``ratio`` at iteration 0 towards 1 at ``warmup_iters``."""
    if iteration >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - ratio)


def learning_rate(
    optim: DictConfig, lr: float, epochs: int, iteration: int, iters_per_epoch: int
) -> float:
    """The LR at a global ``iteration`` (0-based), for an already batch-scaled ``lr``."""
    epoch = iteration // iters_per_epoch
    value = epoch_lr(lr, epoch, epochs, optim.schedule, list(optim.milestones), optim.gamma)
    warmup_iters = optim.warmup_epochs * iters_per_epoch
    if warmup_iters:
        value *= warmup_factor(iteration, warmup_iters, optim.warmup_ratio)
    return value
