"""Progress on rank 0: a tqdm bar on a terminal, plain log lines otherwise (files, CI)."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from benchmark.core.contracts import World


def main_printer(world: World):
    """``say(message)``: a line on stderr from global rank 0 only."""

    def say(message: str) -> None:
        if world.is_main:
            print(message, file=sys.stderr, flush=True)

    return say


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """Images per second and loss for one epoch; silent on ranks other than 0."""

    def __init__(self, world: World, epoch: int, epochs: int, steps: int, global_batch: int):
        self.enabled = world.is_main
        self.epoch, self.epochs, self.steps, self.global_batch = epoch, epochs, steps, global_batch
        self.start = time.perf_counter()
        self.bar = None
        if self.enabled and interactive():
            self.bar = tqdm(
                total=steps * global_batch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="img",
                unit_scale=False,
                dynamic_ncols=True,
                leave=False,
            )

    def step(self, steps_done: int, loss: float | None, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.global_batch)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
        elif loss is not None:
            rate = steps_done * self.global_batch / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"epoch {self.epoch + 1}/{self.epochs} step {steps_done}/{self.steps} "
                f"loss {loss:.4f} lr {lr:.4g} {rate:.1f} img/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, metrics: dict[str, float]) -> str:
        terms = " ".join(
            f"{k} {v:.4f}"
            for k, v in metrics.items()
            if k not in ("lr", "images_per_sec", "epoch_time_s")
        )
        return (
            f"epoch {self.epoch + 1}/{self.epochs}: {terms} lr {metrics.get('lr', 0):.4g} "
            f"{metrics.get('images_per_sec', 0):.1f} img/s ({metrics.get('epoch_time_s', 0):.1f} s)"
        )
