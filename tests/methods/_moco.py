"""What the MoCo-family step tests share: a tiny batch, a short queue, a fixed key shuffle."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import methods.mocov2 as mocov2_module
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method

CTX = StepContext(epoch=0, step=0, epochs=1, steps_per_epoch=1)
BATCH = 8
QUEUE = 20
PERM = torch.tensor([3, 0, 5, 1, 7, 2, 6, 4])


def build(name: str, config_class: type, bn_batch_size: int, **overrides: Any) -> Any:
    """Method ``name`` at 64 px, batch 8, queue 20, with seed 0's initial weights."""
    torch.manual_seed(0)
    ctx = BuildContext(
        world=World(), image_size=64, local_batch_size=BATCH, bn_batch_size=bn_batch_size
    )
    return get_method(name)(config_class(queue_size=QUEUE, **overrides), ctx)


def views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, 64, 64, generator=g) for _ in range(2)]


def fix_key_shuffle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A known key shuffle (``PERM``), so the split-BN groups of a hand computation are known."""
    monkeypatch.setattr(mocov2_module, "batch_shuffle", lambda x: (x[PERM], PERM.argsort()))


def prepare_step(
    model: Any, bn_batch_size: int, monkeypatch: pytest.MonkeyPatch, queue_ptr: int | None = 16
) -> None:
    """Before a hand-computed step: a known key shuffle where BN is split (MoCo-v2's encode
    step draws it), a queue whose next 8 rows wrap (16..19 then 0..3 at ``queue_ptr`` 16),
    and a key encoder that differs from the query encoder so that the EMA is visible."""
    if bn_batch_size < BATCH:
        fix_key_shuffle(monkeypatch)
    with torch.no_grad():
        if queue_ptr is not None:
            model.queue.ptr.fill_(queue_ptr)
        for p in model.encoder_k.parameters():
            p.add_(0.01 * torch.randn_like(p))


def assert_moco_v2_defaults(cfg: Any, name: str) -> None:
    """MoCo-v2's values for NCT (TencentAILabHealthcare/ConCL
    ``configs/NCT_pretraining/moco_v2/r18_bs256_ep200.py``), shared by DenseCL."""
    assert (cfg.name, cfg.depth, cfg.hidden_dim, cfg.feat_dim) == (name, 18, 512, 128)
    assert (cfg.queue_size, cfg.momentum, cfg.temperature, cfg.shuffle_bn) == (
        16384,
        0.999,
        0.2,
        True,
    )
