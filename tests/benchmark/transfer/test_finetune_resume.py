"""A fine-tune stopped in the middle of an epoch resumes exactly: the same batches, flips and
RPN/RoI samples as an uninterrupted run, so the same weights, precise-BN and COCO AP."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.core.errors import UserError
from benchmark.training.checkpoints import CheckpointError
from benchmark.training.loop import Callback
from benchmark.transfer.finetune import METRICS_FILE, finetune, read_metrics
from tests.benchmark._tiny import TINY_FINETUNE


class Logged(Callback):
    """The logged training windows, without the throughput (wall-clock)."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, dict[str, float]]] = []

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        self.windows.append((step, {k: v for k, v in metrics.items() if k != "images_per_sec"}))


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
    once, twice = Logged(), Logged()
    finetune(cfg, "glas", 1, None, World(), straight, [once])
    # stopped after iteration 3: epoch 1, its first batch trained, the second not
    stopped = finetune(cfg, "glas", 1, None, World(), resumed, [twice], stop_after_iter=3)
    assert stopped.metrics == {}
    assert (resumed / "iter_0000003.pth").is_file()
    finetune(cfg, "glas", 1, None, World(), resumed, [twice])
    # windows of 2: the one open at the stop (iterations 3-4) logs the same mean once
    assert [step for step, _ in once.windows] == [2, 4, 5]
    assert twice.windows == once.windows

    a = torch.load(straight / "iter_0000005.pth", weights_only=True)
    b = torch.load(resumed / "iter_0000005.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _scored(straight) == _scored(resumed)
    assert _scored(straight)["precise_bn_batches"] == 2.0
    # scored: only the newest checkpoint is kept (enough to score it again)
    for out in (straight, resumed):
        assert sorted(p.name for p in out.glob("iter_*.pth")) == ["iter_0000005.pth"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"bbox_AP": 1', "cannot be read (JSONDecodeError)"),
        ('{"segm_AP": 2.0}', "has no bbox_AP"),
    ],
)
def test_a_damaged_metrics_file_is_one_line_saying_how_to_rescore(
    tmp_path: Path, text: str, reason: str
):
    (tmp_path / METRICS_FILE).write_text(text)
    with pytest.raises(CheckpointError) as exc:
        finetune(tiny(tmp_path), "glas", 1, None, World(), tmp_path)
    assert str(exc.value) == (
        f"{tmp_path / METRICS_FILE} {reason}: delete it to score this fine-tune again from "
        "its newest checkpoint"
    )


def test_a_scored_fine_tune_is_read_back_and_not_run(tmp_path: Path):
    assert read_metrics(tmp_path) is None
    (tmp_path / METRICS_FILE).write_text('{"bbox_AP": 12.5, "segm_AP": 10.0}')
    result = finetune(tiny(tmp_path), "glas", 1, None, World(), tmp_path)
    assert result.already_done and result.metrics == {"bbox_AP": 12.5, "segm_AP": 10.0}


def test_an_unwritable_output_folder_stops_before_training(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "glas" / "seed1"
    with pytest.raises(UserError, match=r"cannot write into .*: choose a writable output_root="):
        finetune(tiny(tmp_path), "glas", 1, None, World(), out)
    assert not (tmp_path / "coco").exists()  # stopped before converting the data


def test_a_batch_larger_than_the_training_images_is_one_line(tmp_path: Path):
    cfg = tiny(tmp_path)
    # as real data would be (the config check knows only the synthetic set's size)
    cfg.finetune.batch_size = 8
    with pytest.raises(UserError) as exc:
        finetune(cfg, "glas", 1, None, World(), tmp_path / "out")
    assert str(exc.value) == (
        "finetune.batch_size=8 is larger than the 4 glas training images with glands: lower "
        "finetune.batch_size to at most 4"
    )
