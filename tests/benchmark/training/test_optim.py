from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmark.config import ConfigError, load_config
from benchmark.training.optim import LARS, build_optimizer
from methods.param_groups import exclude_norm_and_bias

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 0.1, 0.02


def _lars_step(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, lr: float):
    """One step of the formula in plain torch: returns (w, v)."""
    local_lr = ETA * w.norm() / (g.norm() + WD * w.norm())
    update = local_lr * lr * (g + WD * w)
    v = update if v is None else MOMENTUM * v + update
    return w - v, v


def _params() -> tuple[nn.Parameter, nn.Parameter]:
    weight = nn.Parameter(torch.tensor([[3.0, -4.0], [1.0, 2.0]]))
    bias = nn.Parameter(torch.tensor([0.5, -1.5]))
    return weight, bias


def test_two_steps_with_momentum_follow_the_formula() -> None:
    weight, bias = _params()
    opt = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WD,
        eta=ETA,
    )
    grads = [
        (torch.tensor([[0.3, 0.1], [-0.2, 0.4]]), torch.tensor([0.2, -0.1])),
        (torch.tensor([[-0.1, 0.5], [0.6, 0.0]]), torch.tensor([-0.3, 0.4])),
    ]
    lrs = [LR, 0.25]  # the engine sets each group's lr before every step
    w, v = weight.detach().clone(), None
    b, vb = bias.detach().clone(), None
    for (gw, gb), lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        weight.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        w, v = _lars_step(w, gw, v, lr)
        # Excluded: local_lr = 1 and the group's own weight decay (0), plain momentum.
        vb = lr * gb if vb is None else MOMENTUM * vb + lr * gb
        b = b - vb
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)

    # The first step by hand, as numbers: ‖w‖ = √30, ‖g‖ = √0.3.
    w0 = torch.tensor([[3.0, -4.0], [1.0, 2.0]])
    g0 = grads[0][0]
    local_lr = 0.02 * 30**0.5 / (0.3**0.5 + 0.1 * 30**0.5)
    torch.testing.assert_close(
        _lars_step(w0, g0, None, LR)[0], w0 - local_lr * 0.5 * (g0 + 0.1 * w0)
    )
    torch.testing.assert_close(opt.state[weight]["momentum_buffer"], v)


def test_excluded_group_equals_sgd_at_constant_lr() -> None:
    bias = nn.Parameter(torch.tensor([0.5, -1.5]))
    reference = nn.Parameter(bias.detach().clone())
    lars = LARS([{"params": [bias], "weight_decay": 0.0, "lars_exclude": True}], lr=LR, eta=ETA)
    sgd = torch.optim.SGD([reference], lr=LR, momentum=0.9)
    for g in (torch.tensor([0.2, -0.1]), torch.tensor([-0.3, 0.4]), torch.tensor([1.0, 0.0])):
        bias.grad, reference.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(bias, reference)


@pytest.mark.parametrize(
    ("w0", "g", "wd", "expected"),
    [
        # Zero-initialised layer: trust ratio 1, so it moves by lr·g (OpenSelfSup: stays 0).
        ([0.0, 0.0], [0.3, -0.4], 0.1, [-0.15, 0.2]),
        # Zero gradient without weight decay: trust ratio 1, no 0·∞, no move.
        ([1.0, 2.0], [0.0, 0.0], 0.0, [1.0, 2.0]),
        # Zero gradient with weight decay: trust ratio 1, plain decay lr·wd·w.
        ([1.0, 2.0], [0.0, 0.0], 0.1, [0.95, 1.9]),
    ],
    ids=["zero_weight", "zero_grad", "zero_grad_decay"],
)
def test_trust_ratio_is_one_when_a_norm_is_zero(w0, g, wd, expected) -> None:
    p = nn.Parameter(torch.tensor(w0))
    opt = LARS([p], lr=LR, momentum=0.0, weight_decay=wd, eta=ETA)
    p.grad = torch.tensor(g)
    opt.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), torch.tensor(expected))
    assert "momentum_buffer" not in opt.state[p]  # momentum 0 keeps no state


def test_parameters_without_gradient_are_left_alone() -> None:
    weight, bias = _params()
    opt = LARS([weight, bias], lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA)
    weight.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([0.5, -1.5]), rtol=0, atol=0)
    assert bias not in opt.state


def test_invalid_settings_raise() -> None:
    weight, _ = _params()
    with pytest.raises(ValueError, match="invalid LARS"):
        LARS([weight], lr=0.1, eta=0.0)


def test_build_optimizer_by_name() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = exclude_norm_and_bias(model)
    sgd = build_optimizer("sgd", groups, 0.03, 0.9, 1e-4)
    assert type(sgd) is torch.optim.SGD
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert sgd.param_groups[0]["lr"] == 0.03 and sgd.param_groups[0]["momentum"] == 0.9
    lars = build_optimizer("lars", exclude_norm_and_bias(model), 0.6, 0.9, 1e-6, 0.002)
    assert type(lars) is LARS
    decayed, excluded = lars.param_groups
    assert (decayed["lr"], decayed["momentum"], decayed["weight_decay"]) == (0.6, 0.9, 1e-6)
    assert (decayed["eta"], decayed["lars_exclude"]) == (0.002, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
    }
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; use one of sgd, lars"):
        build_optimizer("adam", groups, 0.1, 0.9, 0.0)


def test_config_rejects_other_optimizers() -> None:
    with pytest.raises(ConfigError, match="optim.name 'adam' is not supported; use sgd or lars"):
        load_config("mocov2", "paper", overrides=("optim.name=adam",), announce=False)
    with pytest.raises(ConfigError, match="optim.trust_coefficient must be > 0"):
        load_config("simclr", "paper", overrides=("optim.trust_coefficient=0",), announce=False)
