"""Tiny pre-training runs: a folder of random 40 px images and the overrides to use it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(32):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:03d}.png")
    return root


@pytest.fixture
def tiny_overrides(image_folder: Path) -> Callable[..., tuple[str, ...]]:
    """Overrides for a 2-epoch MoCo-v2 run on ``image_folder`` at 32 px, batch 8, on the CPU."""

    def make(out: Path, *extra: str) -> tuple[str, ...]:
        return (
            f"data.root={image_folder}",
            "data.list_file=null",
            "data.synthetic=false",
            "data.image_size=32",
            "data.num_workers=0",
            "pretrain.batch_size=8",
            "pretrain.bn_batch_size=4",
            "pretrain.epochs=2",
            "pretrain.device=cpu",
            "pretrain.channels_last=false",
            "method.queue_size=64",
            f"output_root={out}",
            *extra,
        )

    return make
