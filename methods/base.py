"""The plugin contract: what a pre-training method owns, and what the engine owns.

``World``, ``MethodConfig`` and the build/step contexts live in the torch-free
``benchmark.core.contracts`` and are re-exported here for plugin authors.

The engine owns the process group, DDP, optimizer, LR schedule, AMP, channels_last,
checkpoints, tracking and progress. A method owns its networks, its views and its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

from torch import Tensor, nn

from benchmark.core.contracts import BuildContext, MethodConfig, StepContext, World

__all__ = ["BuildContext", "Method", "MethodConfig", "StepContext", "World"]


class Method(nn.Module):
    """A pre-training method plugin.

    Subclasses set ``config_class`` and are registered with ``@register_method("name")``.
    ``forward`` is the training step: the engine calls it through DDP so that gradient
    synchronisation covers exactly the parameters the loss used.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""
    #: DDP option; True only for methods whose loss skips parameters on some steps.
    find_unused_parameters: ClassVar[bool] = False
    #: False for baselines that skip pre-training (random initialisation).
    pretrains: ClassVar[bool] = True
    #: True for methods whose BN spans the global batch (SimCLR, BYOL): the engine converts
    #: BatchNorm to SyncBatchNorm under DDP on CUDA. One process already sees the batch.
    sync_bn: ClassVar[bool] = False
    #: True for methods that need each sample's dataset index (PCL's cluster assignments):
    #: the loader then appends a (B,) long tensor of indices after the views.
    wants_sample_index: ClassVar[bool] = False
    #: True for methods that train on the class of each image (the supervised reference row):
    #: the loader then appends a (B,) long tensor of class indices after the views (and after
    #: the indices, when both are asked for), and ``BuildContext.num_classes`` is set.
    wants_labels: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, build: BuildContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.build_ctx = build

    def views(self) -> Callable[[Any], list[Tensor]]:
        """Per-sample transform: one PIL image to the list of view tensors."""
        raise NotImplementedError

    def forward(self, views: list[Tensor], ctx: StepContext) -> dict[str, Tensor]:
        """One training step's loss: ``{"loss": total, <term>: value, ...}``."""
        raise NotImplementedError

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Hook for per-epoch switches (warm-up)."""

    def wants_dataset_pass(self, ctx: StepContext) -> bool:
        """True before epochs that start with a pass over the whole training set (PCL)."""
        return False

    def eval_view(self) -> Callable[[Any], Tensor]:
        """Transform of the dataset pass: one un-augmented view per image."""
        from methods.augment import center_view

        return center_view(self.build_ctx.image_size)

    def on_dataset_pass(
        self, batches: Iterable[tuple[Tensor, Tensor]], num_samples: int, ctx: StepContext
    ) -> dict[str, float]:
        """Consume ``(indices, images)`` batches of this process's share of the training set,
        already on the device; returns metrics to log. Collectives are the method's own."""
        raise NotImplementedError(f"method {self.name!r} asked for a dataset pass")

    def on_step_end(self, ctx: StepContext) -> None:
        """Hook after the optimizer step (e.g. momentum schedules)."""

    def backbone(self) -> nn.Module:
        """The encoder that is exported: online / query, never momentum."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; one group of all trainable parameters by default."""
        return [{"params": list(self.trainable_parameters())}]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Optuna search space as config overrides; methods that are tuned override it."""
        raise NotImplementedError(f"method {cls.name!r} defines no search space")
