"""What every process and every method plugin is told: its place in the job and in training.

Imports nothing heavy: ``World.device`` is a ``torch.device``, made only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING

if TYPE_CHECKING:
    import torch


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class World:
    """Where this process sits in the job (torchrun's view, or one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class BuildContext:
    """What a method needs to know about the run to build itself.

    ``bn_batch_size`` is the per-GPU batch of the original 8-GPU layout (32): BatchNorm
    statistics are computed over groups of that many images whatever the actual layout,
    so one process with batch 256 normalises like eight GPUs with 32 each.

    ``num_classes`` is the number of class folders of the pre-training set, set by the engine
    only for methods that train on labels (``Method.wants_labels``; None for the others). It
    is a fact of the data, not a hyperparameter: it lives here rather than in the method's
    config so that no YAML can contradict the folders, and it stays out of the config hash
    because it follows from ``data.root`` / ``data.list_file``, which are hashed (as the
    images themselves are only by those keys).
    """

    world: World
    image_size: int
    local_batch_size: int
    bn_batch_size: int
    num_classes: int | None = None

    @property
    def bn_splits(self) -> int:
        if self.local_batch_size % self.bn_batch_size:
            raise ValueError(
                f"per-process batch {self.local_batch_size} is not a multiple of "
                f"pretrain.bn_batch_size={self.bn_batch_size}: change pretrain.batch_size, "
                "the number of GPUs or pretrain.bn_batch_size"
            )
        return self.local_batch_size // self.bn_batch_size


@dataclass(frozen=True)
class StepContext:
    """Position in training, passed to every step and hook (0-based)."""

    epoch: int
    step: int
    epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class MethodConfig:
    """Base of every method's typed hyperparameters; subclasses hold the paper defaults."""

    name: str = MISSING

    def problems(self) -> list[str]:
        """Values the types allow but the method cannot use, as ``key must ...`` lines."""
        return []

    def revision(self) -> int:
        """Bumped when the code computes something else for the same values (a fidelity fix):
        a non-zero revision enters the config hash, so runs made before are not reused."""
        return 0
