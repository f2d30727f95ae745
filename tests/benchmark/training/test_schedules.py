from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from benchmark.training.schedules import epoch_lr, learning_rate, scaled_lr, warmup_factor


def test_linear_scaling():
    assert scaled_lr(0.03, 32, 256) == pytest.approx(0.00375)
    assert scaled_lr(0.03, 512, 256) == pytest.approx(0.06)
    assert scaled_lr(0.03, 32, 256, scale=False) == 0.03


def test_cosine_is_per_epoch_and_reaches_zero_at_horizon():
    # mmcv CosineAnnealing by epoch: lr * (1 + cos(pi * e / E)) / 2
    assert epoch_lr(0.03, 0, 200, "cosine") == pytest.approx(0.03)
    assert epoch_lr(0.03, 100, 200, "cosine") == pytest.approx(0.015)
    assert epoch_lr(0.03, 50, 200, "cosine") == pytest.approx(0.015 * (1 + math.cos(math.pi / 4)))
    assert epoch_lr(0.03, 200, 200, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_step_decay_like_mocov1():
    assert epoch_lr(0.03, 119, 200, "step", [120, 160]) == pytest.approx(0.03)
    assert epoch_lr(0.03, 120, 200, "step", [120, 160]) == pytest.approx(0.003)
    assert epoch_lr(0.03, 160, 200, "step", [120, 160]) == pytest.approx(0.0003)


def test_warmup_from_ratio():
    assert warmup_factor(0, 10, 1e-4) == pytest.approx(1e-4)
    assert warmup_factor(5, 10, 0.0) == pytest.approx(0.5)
    assert warmup_factor(10, 10, 1e-4) == 1.0


def test_learning_rate_constant_within_epoch():
    optim = OmegaConf.create(
        {
            "schedule": "cosine",
            "milestones": [],
            "gamma": 0.1,
            "warmup_epochs": 0,
            "warmup_ratio": 0.0,
        }
    )
    values = [learning_rate(optim, 0.1, 4, it, 5) for it in range(20)]
    assert values[:5] == [pytest.approx(0.1)] * 5
    assert values[5] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert len(set(values)) == 4
    optim.warmup_epochs = 1
    assert learning_rate(optim, 0.1, 4, 0, 5) == pytest.approx(0.0)
    assert learning_rate(optim, 0.1, 4, 4, 5) == pytest.approx(0.1 * 0.8)
