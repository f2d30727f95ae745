"""Random initialisation: the benchmark's baseline row, with no pre-training at all."""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.core.registry import register_method
from methods.base import Method, MethodConfig


@dataclass
class RandomInitConfig(MethodConfig):
    name: str = "random"


@register_method("random")
class RandomInit(Method):
    """No pre-training: the detector starts from randomly initialised weights."""

    config_class = RandomInitConfig
    pretrains = False
