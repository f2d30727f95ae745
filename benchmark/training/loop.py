"""The one optimisation loop of both training stages (pre-training and fine-tuning).

It owns what the two stages share: the LR written into every parameter group each step,
bf16 autocast, the backward/step, loss sums kept on the device (no host sync per step),
their mean over the window and over processes, the finite-loss check, throughput, periodic
checkpoints through one ``CheckpointManager``, and the events that the MLflow layer and
progress output subscribe to. A stage owns what differs: how a batch becomes a loss dict,
the LR schedule, what a checkpoint holds and when a window ends (an epoch, or every
``log_every`` iterations).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmark.core.contracts import World
from benchmark.core.errors import UserError
from benchmark.training.checkpoints import CheckpointManager

#: One training step's forward: (batch, step) -> {"loss": total, <term>: value, ...}.
Forward = Callable[[Any, int], Mapping[str, Tensor]]
#: The key under which a checkpoint carries the open logging window (its loss sums, averaged
#: over processes, and its step count), so a resumed run logs what an uninterrupted one did.
WINDOW_KEY = "loop_window"


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


class Callback:
    """Events of a training loop; subclasses override what they need (rank 0 and others alike:
    a tracker off rank 0 does nothing, so subscribers need no rank checks)."""

    def on_step_end(self, step: int, loss: float | None, lr: float) -> None:
        """After each optimizer step; ``loss`` is synced to the host every ``log_every`` steps
        only (None otherwise)."""

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        """At the end of each window: its mean losses over steps and processes, lr, rate."""

    def on_epoch_end(self, metrics: Mapping[str, float], epoch: int) -> None:
        """Epoch-based stages: after epoch ``epoch`` (1-based) with its metrics."""

    def on_checkpoint(self, path: Path, step: int) -> None:
        """A checkpoint was written (rank 0)."""

    def on_done(self, metrics: Mapping[str, float]) -> None:
        """The stage finished (its final metrics, e.g. COCO AP)."""


class OnLog(Callback):
    """Adapter: a plain ``fn(metrics, step)`` subscribed to ``on_log``."""

    def __init__(self, fn: Callable[[Mapping[str, float], int], None]) -> None:
        self.fn = fn

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.fn(metrics, step)


class Callbacks(Callback):
    """Fan-out of every event to a list of callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_step_end(self, step: int, loss: float | None, lr: float) -> None:
        for cb in self.callbacks:
            cb.on_step_end(step, loss, lr)

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        for cb in self.callbacks:
            cb.on_log(metrics, step)

    def on_epoch_end(self, metrics: Mapping[str, float], epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(metrics, epoch)

    def on_checkpoint(self, path: Path, step: int) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path, step)

    def on_done(self, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_done(metrics)


class TrainingLoop:
    """Steps an optimizer over batches; see the module docstring for who owns what.

    ``lr_at(step)`` is the schedule (0-based global step), ``after_step(step)`` a hook after
    each optimizer step (momentum updates), ``global_batch`` the images per step over all
    processes (for throughput), ``diverged(value, step)`` the one-line message of a
    non-finite loss (it names the stage, its position and the LR key to lower).
    """

    def __init__(
        self,
        world: World,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_at: Callable[[int], float],
        *,
        global_batch: int,
        log_every: int,
        diverged: Callable[[float, int], str],
        amp_bf16: bool = False,
        after_step: Callable[[int], None] | None = None,
        checkpoints: CheckpointManager | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.world, self.model, self.optimizer = world, model, optimizer
        self.lr_at, self.after_step = lr_at, after_step
        self.global_batch, self.log_every = global_batch, log_every
        self.diverged = diverged
        self.autocast_dtype = torch.bfloat16 if amp_bf16 else None
        self.checkpoints = checkpoints
        self.events = Callbacks(callbacks)

    def run(
        self,
        batches: Iterable[Any],
        steps: range,
        forward: Forward,
        *,
        window: int | None = None,
        checkpoint_every: int | None = None,
        state: Callable[[int], dict[str, Any]] | None = None,
        extra_metrics: Callable[[float], dict[str, float]] | None = None,
        resume_window: Mapping[str, Any] | None = None,
        close_at_stop: bool = True,
    ) -> dict[str, float]:
        """Train ``steps`` (global, 0-based), one batch each, and return the last window's
        metrics. A window ends every ``window`` steps counted from step 0 (None: at the end of
        ``steps`` only) and at the end of ``steps``; there the sums become means over the
        window and over processes, are checked for finiteness and sent to ``on_log``.
        ``checkpoint_every`` saves ``state(done)`` every that many steps and at the end, with
        the open window under ``WINDOW_KEY``; pass that back as ``resume_window`` to continue
        it, so the window that spans a resume logs the mean an uninterrupted run logs.
        ``close_at_stop=False`` leaves a window open at the end of ``steps`` (a stage stopped
        before its last step, as an interruption would, logs no partial window)."""
        device = self.world.device
        sums: dict[str, Tensor] = {}
        count = 0
        if resume_window:
            sums = {k: v.to(device) for k, v in resume_window["sums"].items()}
            count = int(resume_window["count"])
        fresh = 0  # steps of the open window run by this call (for the throughput)
        lr = 0.0
        metrics: dict[str, float] = {}
        tic = time.perf_counter()

        def close_window(step: int) -> dict[str, float]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - tic
            means = self.reduce_means(sums, count)
            self._check_finite(means.get("loss", 0.0), step)
            means["lr"] = lr
            means["images_per_sec"] = fresh * self.global_batch / max(elapsed, 1e-9)
            if extra_metrics is not None:
                means.update(extra_metrics(elapsed))
            self.events.on_log(means, step + 1)
            return means

        step = steps.start - 1
        for step, batch in zip(steps, batches, strict=False):
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(
                device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                out = forward(batch, step)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step(step)
            for key, value in out.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value
            count += 1
            fresh += 1
            done = step + 1
            synced = None
            if count % self.log_every == 0:
                synced = float(loss.detach())
                self._check_finite(synced, step)
            self.events.on_step_end(step, synced, lr)
            at_stop = done == steps.stop and close_at_stop
            if at_stop or (window is not None and done % window == 0):
                metrics = close_window(step)
                sums, count, fresh, tic = {}, 0, 0, time.perf_counter()
            due = checkpoint_every is not None and (
                done % checkpoint_every == 0 or done == steps.stop
            )
            if due and state is not None:
                window_state = self.window_state(sums, count)
                self.save_checkpoint(done, {**state(done), WINDOW_KEY: window_state})
        if count and fresh and (close_at_stop or step + 1 < steps.stop):
            metrics = close_window(step)  # the batches ran out before ``steps`` did
        return metrics

    def window_state(self, sums: Mapping[str, Tensor], count: int) -> dict[str, Any]:
        """The open window as a checkpoint holds it: sums averaged over processes (a
        collective: every rank calls it), on the CPU. Resumed on every rank, they give the
        same window mean as each rank's own sums would have (the mean is linear)."""
        keys = sorted(sums)
        if not keys:
            return {"sums": {}, "count": count}
        stacked = torch.stack([sums[k].detach().float() for k in keys])
        if self.world.is_distributed:
            stacked = stacked.clone()
            dist.all_reduce(stacked)
            stacked /= self.world.world_size
        return {"sums": dict(zip(keys, stacked.cpu().unbind(), strict=True)), "count": count}

    def reduce_means(self, sums: Mapping[str, Tensor], steps: int) -> dict[str, float]:
        """The per-step means of ``sums``, averaged over processes (one collective)."""
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([sums[k] for k in keys]) / max(steps, 1)
        if self.world.is_distributed:
            dist.all_reduce(stacked)
            stacked /= self.world.world_size
        return dict(zip(keys, stacked.tolist(), strict=True))

    def save_checkpoint(self, n: int, state: dict[str, Any]) -> Path | None:
        """Write ``state`` as checkpoint ``n`` through the manager (rank 0) and announce it."""
        if self.checkpoints is None:
            return None
        path = self.checkpoints.save(state, n)
        if path is not None:
            self.events.on_checkpoint(path, n)
        return path

    def _check_finite(self, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(self.diverged(value, step))
