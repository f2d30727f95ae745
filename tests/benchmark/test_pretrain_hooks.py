"""The engine's side of the plugin contract: optimizer choice, sample indices, dataset pass."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from benchmark.config import load_config
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import _METHODS, register_method
from benchmark.pretrain import run_pretrain
from benchmark.training.optim import LARS
from methods.augment import MultiView, normalize
from methods.backbones import build_trunk
from methods.base import Method, MethodConfig


@dataclass
class ProbeConfig(MethodConfig):
    name: str = "probe"
    depth: int = 18
    queue_size: int = 0  # tiny_overrides sets it; unused


class Probe(Method):
    """Records what the engine hands it: indices in batches, dataset passes."""

    config_class = ProbeConfig
    wants_sample_index = True
    passes: list[tuple[int, list[int], int]] = []
    indices: list[list[int]] = []

    def __init__(self, cfg: ProbeConfig, build: BuildContext) -> None:
        super().__init__(cfg, build)
        self.trunk = build_trunk(cfg.depth)

    def views(self):
        return MultiView([normalize()])

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        images, index = views
        Probe.indices.append(index.tolist())
        return {"loss": self.trunk(images).pow(2).mean()}

    def wants_dataset_pass(self, ctx: StepContext) -> bool:
        return ctx.epoch >= 1

    def on_dataset_pass(
        self, batches: Iterable[tuple[Tensor, Tensor]], num_samples: int, ctx: StepContext
    ) -> dict[str, float]:
        seen: list[int] = []
        for idx, images in batches:
            assert images.dim() == 4
            seen += idx.tolist()
        Probe.passes.append((ctx.epoch, seen, num_samples))
        return {"pass_images": float(len(seen))}

    def backbone(self) -> nn.Module:
        return self.trunk


@pytest.fixture
def probe():
    register_method("probe")(Probe)
    Probe.passes, Probe.indices = [], []
    yield Probe
    _METHODS.pop("probe", None)


def test_indices_reach_the_step_and_the_dataset_pass_sees_every_sample_once(
    probe, tiny_overrides, tmp_path: Path
):
    cfg = load_config(
        "probe", "demo", overrides=tiny_overrides(tmp_path, "optim.name=lars"), announce=False
    )
    result = run_pretrain(cfg, World())
    assert isinstance(result.method, Probe)
    # 32 images, batch 8: 4 steps per epoch; each epoch's indices are a permutation of all
    for epoch in range(2):
        seen = sum(Probe.indices[epoch * 4 : epoch * 4 + 4], [])
        assert sorted(seen) == list(range(32))
    # the pass runs before epoch 2 only (wants_dataset_pass), over every sample in order
    assert Probe.passes == [(1, list(range(32)), 32)]


def test_lars_is_built_with_the_method_param_groups(probe, tiny_overrides, tmp_path: Path):
    from benchmark.pretrain import Pretrainer, build_method

    cfg = load_config(
        "probe",
        "demo",
        overrides=tiny_overrides(tmp_path, "optim.name=lars", "optim.trust_coefficient=0.002"),
        announce=False,
    )
    method = build_method(cfg, World())
    trainer = Pretrainer(cfg, World(), method, steps_per_epoch=1)
    assert isinstance(trainer.optimizer, LARS)
    group = trainer.optimizer.param_groups[0]
    assert group["eta"] == 0.002 and group["weight_decay"] == cfg.optim.weight_decay
    assert torch.isclose(torch.tensor(group["lr"]), torch.tensor(0.03 * 8 / 256))
