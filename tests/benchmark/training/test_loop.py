from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmark.core.contracts import World
from benchmark.training.checkpoints import CheckpointManager
from benchmark.training.loop import WINDOW_KEY, Callback, TrainingDiverged, TrainingLoop


class Record(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float | None, float]] = []
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[int] = []

    def on_step_end(self, step: int, loss: float | None, lr: float) -> None:
        self.steps.append((step, loss, lr))

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.logs.append((step, dict(metrics)))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append(step)


def _loop(record: Record, log_every: int = 2, manager: CheckpointManager | None = None):
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loop = TrainingLoop(
        World(),
        model,
        opt,
        lambda step: 0.1 * (step + 1),
        global_batch=4,
        log_every=log_every,
        diverged=lambda value, step: f"loss is {value} at step {step + 1}",
        checkpoints=manager,
        callbacks=[record],
    )
    return model, opt, loop


def _forward(model: nn.Module):
    # loss = w * x, gradient x: SGD makes w <- w - lr * x
    def forward(x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        loss = model(x).sum()
        return {"loss": loss, "twice": 2 * loss}

    return forward


def test_lr_step_window_means_and_checkpoints(tmp_path: Path):
    record = Record()
    manager = CheckpointManager(tmp_path, "iter")
    model, opt, loop = _loop(record, manager=manager)
    batches = [torch.ones(1, 1)] * 5
    last = loop.run(
        batches,
        range(0, 5),
        _forward(model),
        window=3,
        checkpoint_every=2,
        state=lambda done: {"iteration": done, "w": model.weight.item()},
    )
    # w: 1 -> 0.9 -> 0.7 -> 0.4 -> 0.0 -> -0.5; each step's loss is w before the step
    losses = [1.0, 0.9, 0.7, 0.4, 0.0]
    assert [s for s, _, _ in record.steps] == [0, 1, 2, 3, 4]
    assert [lr for _, _, lr in record.steps] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # the loss is synced to the host every log_every steps of the window only
    assert [loss for _, loss, _ in record.steps] == [
        None,
        pytest.approx(0.9),
        None,
        None,
        pytest.approx(0.0, abs=1e-6),
    ]
    assert [step for step, _ in record.logs] == [3, 5]  # windows end at multiples of 3 and at 5
    first, second = record.logs[0][1], record.logs[1][1]
    assert first["loss"] == pytest.approx(sum(losses[:3]) / 3)
    assert first["twice"] == pytest.approx(2 * sum(losses[:3]) / 3)
    assert second["loss"] == pytest.approx(sum(losses[3:]) / 2)
    assert first["lr"] == pytest.approx(0.3) and second["lr"] == pytest.approx(0.5)
    assert first["images_per_sec"] > 0
    assert last == second
    assert model.weight.item() == pytest.approx(-0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert record.checkpoints == [2, 4, 5]
    assert [n for n, _ in manager.found()] == [2, 4, 5]
    assert torch.load(manager.path(4))["w"] == pytest.approx(0.0, abs=1e-6)


def test_resumed_range_and_batches_that_run_out():
    record = Record()
    model, _, loop = _loop(record)
    # steps 7..9 of a run; windows of 4 counted from step 0 end after step 8 (done 8)
    loop.run([torch.ones(1, 1)] * 3, range(7, 10), _forward(model), window=4)
    assert [step for step, _ in record.logs] == [8, 10]
    record.logs.clear()
    loop.run([torch.ones(1, 1)] * 2, range(0, 10), _forward(model))  # only 2 batches
    assert [step for step, _ in record.logs] == [2]


def test_a_window_open_at_a_checkpoint_continues_after_the_resume(tmp_path: Path):
    batches = [torch.full((1, 1), float(i + 1)) for i in range(8)]

    def run(steps: range, manager: CheckpointManager, window=None, close=True, model=None):
        record = Record()
        model_, opt, loop = _loop(record, manager=manager)
        if model is not None:
            model_.load_state_dict(model)
        loop.run(
            batches[steps.start :],
            steps,
            _forward(model_),
            window=4,
            checkpoint_every=3,
            state=lambda done: {"model": model_.state_dict()},
            resume_window=window,
            close_at_stop=close,
        )
        return record

    straight = run(range(0, 8), CheckpointManager(tmp_path / "a", "iter"))
    manager = CheckpointManager(tmp_path / "b", "iter")
    stopped = run(range(0, 3), manager, close=False)  # stopped after step 3 of a window of 4
    assert stopped.logs == []  # no partial window, as a kill would log none
    saved = torch.load(manager.path(3), weights_only=True)
    assert saved[WINDOW_KEY]["count"] == 3
    # loss = w * x with w <- w - lr * x: the three steps' losses summed, by hand
    w, total = 1.0, 0.0
    for step, x in enumerate((1.0, 2.0, 3.0)):
        total += w * x
        w -= 0.1 * (step + 1) * x
    assert float(saved[WINDOW_KEY]["sums"]["loss"]) == pytest.approx(total)
    resumed = run(range(3, 8), manager, saved[WINDOW_KEY], model=saved["model"])
    assert [s for s, _ in resumed.logs] == [s for s, _ in straight.logs] == [4, 8]
    for (_, a), (_, b) in zip(resumed.logs, straight.logs, strict=True):
        assert a["loss"] == b["loss"] and a["twice"] == b["twice"]
    assert torch.load(manager.path(8))[WINDOW_KEY] == {"sums": {}, "count": 0}


def test_a_non_finite_loss_stops_with_the_stage_message():
    record = Record()
    model, _, loop = _loop(record, log_every=1)
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at step 2$"):
        loop.run([torch.ones(1, 1), torch.full((1, 1), math.nan)], range(0, 2), _forward(model))


def _two_process_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        record = Record()
        model = nn.Linear(1, 1, bias=False)
        nn.init.constant_(model.weight, 1.0)
        loop = TrainingLoop(
            World(rank=rank, world_size=2),
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            lambda step: 0.0,
            global_batch=2,
            log_every=1,
            diverged=lambda value, step: "diverged",
            callbacks=[record],
        )
        # rank r sees x = r + 1 at every step: its loss is r + 1 (w stays 1 at lr 0)
        loop.run([torch.full((1, 1), rank + 1.0)] * 2, range(0, 2), _forward(model), window=2)
        torch.save(record.logs, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_window_means_are_averaged_over_processes(tmp_path: Path):
    mp.spawn(_two_process_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        logs = torch.load(tmp_path / f"rank{rank}.pt")
        assert [step for step, _ in logs] == [2]
        assert logs[0][1]["loss"] == pytest.approx((1.0 + 2.0) / 2)  # every rank logs the mean
        assert logs[0][1]["twice"] == pytest.approx(3.0)
