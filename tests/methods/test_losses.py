from __future__ import annotations

import math

import torch

from methods.losses import info_nce

TAU = 0.2


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    k = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0]])
    negatives = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -0.6, 0.8]])
    return q, k, negatives


def _by_hand(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> float:
    """-log softmax(logits)[0] with logits = [q·k, q·n_1, ...] / τ, averaged over rows."""
    q, k, negatives = q.double().tolist(), k.double().tolist(), negatives.double().tolist()

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    total = 0.0
    for qi, ki in zip(q, k, strict=True):
        logits = [dot(qi, ki) / TAU] + [dot(qi, n) / TAU for n in negatives]
        total += -logits[0] + math.log(sum(math.exp(z) for z in logits))
    return total / len(q)


def test_matches_hand_computation() -> None:
    q, k, negatives = _data()
    # row 0: logits [0.6, 0, 1, 0] / 0.2 = [3, 0, 5, 0]; row 1: [0.6, 0.8, 0, 0.28] / 0.2
    row0 = -3.0 + math.log(math.exp(3) + 1 + math.exp(5) + 1)
    row1 = -3.0 + math.log(math.exp(3) + math.exp(4) + 1 + math.exp(1.4))
    loss = info_nce(q, k, negatives, TAU)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), (row0 + row1) / 2, rel_tol=1e-6)
    assert math.isclose(loss.item(), _by_hand(q, k, negatives), rel_tol=1e-6)


def test_gradient_matches_softmax_formula() -> None:
    q, k, negatives = _data()
    q.requires_grad_(True)
    info_nce(q, k, negatives, TAU).backward()
    keys = torch.cat([k.unsqueeze(1), negatives.expand(2, -1, -1)], dim=1)  # (N, 1+K, D)
    logits = torch.einsum("nd,nkd->nk", q.detach(), keys) / TAU
    target = torch.zeros_like(logits)
    target[:, 0] = 1.0
    expected = torch.einsum("nk,nkd->nd", logits.softmax(1) - target, keys) / TAU / 2
    torch.testing.assert_close(q.grad, expected)


def test_bf16_inputs_are_computed_in_float32() -> None:
    q, k, negatives = (t.bfloat16() for t in _data())
    loss = info_nce(q, k, negatives, TAU)
    assert loss.dtype == torch.float32
    # Exactly the hand value of the bf16-rounded inputs: no bf16 arithmetic inside.
    assert math.isclose(loss.item(), _by_hand(q, k, negatives), rel_tol=1e-6)


def test_autocast_does_not_lower_precision() -> None:
    q, k, negatives = _data()
    expected = info_nce(q, k, negatives, TAU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, k, negatives, TAU)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
