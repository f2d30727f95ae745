from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.momentum import ema_update_, momentum_copy


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def test_copy_is_equal_frozen_and_independent() -> None:
    online = _net()
    target = momentum_copy(online)
    for (name, p_t), p_o in zip(target.named_parameters(), online.parameters(), strict=True):
        assert not p_t.requires_grad, name
        assert p_o.requires_grad
        assert p_t.data_ptr() != p_o.data_ptr()
        torch.testing.assert_close(p_t, p_o, rtol=0, atol=0)
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(target[0].weight, online[0].weight)


def test_ema_values_by_hand_and_buffers_untouched() -> None:
    online, target = _net(), _net()
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(3.0)
        for p in target.parameters():
            p.fill_(1.0)
        target[1].running_mean.fill_(-5.0)
        online[1].running_mean.fill_(7.0)
    ema_update_(target, online, momentum=0.9)
    for p in target.parameters():  # 0.9 * 1 + 0.1 * 3
        torch.testing.assert_close(p, torch.full_like(p, 1.2))
    ema_update_(target, online, momentum=0.5)  # 0.5 * 1.2 + 0.5 * 3
    torch.testing.assert_close(target[0].bias, torch.full((3,), 2.1))
    torch.testing.assert_close(target[1].running_mean, torch.full((3,), -5.0))
    assert target[1].num_batches_tracked.item() == 0
    for p in online.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 3.0))


def test_ema_builds_no_graph() -> None:
    online = _net()
    target = momentum_copy(online)
    ema_update_(target, online, 0.99)
    assert all(p.grad_fn is None and not p.requires_grad for p in target.parameters())


def test_mismatched_modules_raise() -> None:
    with pytest.raises(ValueError, match="parameters"):
        ema_update_(nn.Linear(2, 2), _net(), 0.9)
