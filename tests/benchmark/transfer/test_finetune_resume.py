"""A fine-tune stopped in the middle of an epoch resumes exactly: the same batches, flips and
RPN/RoI samples as an uninterrupted run, so the same weights, precise-BN and COCO AP."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.transfer.finetune import METRICS_FILE, finetune
from tests.benchmark._tiny import TINY_FINETUNE


def tiny(tmp_path: Path, *extra: str):
    overrides = (
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}",
        *TINY_FINETUNE,
        # 4 images, batch 2: 2 iterations an epoch; 5 iterations and 2 precise-BN batches
        "finetune.glas.iterations=5",
        "finetune.num_workers=2",
        *extra,
    )
    return load_config("random", "demo", overrides=overrides, announce=False)


def _scored(out: Path) -> dict[str, float]:
    metrics = json.loads((out / METRICS_FILE).read_text())
    del metrics["eval_time_s"]
    return metrics


def test_fine_tune_stopped_mid_epoch_resumes_as_if_never_stopped(tmp_path: Path):
    cfg = tiny(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(cfg, "glas", 1, None, World(), straight)
    # stopped after iteration 3: epoch 1, its first batch trained, the second not
    assert finetune(cfg, "glas", 1, None, World(), resumed, stop_after_iter=3).metrics == {}
    assert (resumed / "iter_0000003.pth").is_file()
    finetune(cfg, "glas", 1, None, World(), resumed)

    a = torch.load(straight / "iter_0000005.pth", weights_only=True)
    b = torch.load(resumed / "iter_0000005.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _scored(straight) == _scored(resumed)
    assert _scored(straight)["precise_bn_batches"] == 2.0
