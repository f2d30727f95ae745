"""One entry per (metric, step) after a resume that repeats logged work: a pre-training
killed after an epoch was logged but before its checkpoint was written."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.pretrain import run_pretrain


def test_an_epoch_logged_before_its_lost_checkpoint_is_logged_once(tiny_overrides, tmp_path: Path):
    overrides = tiny_overrides(tmp_path / "out", "pretrain.checkpoint_every=1", "pretrain.epochs=3")
    cfg = load_config("mocov2", "demo", overrides=overrides, announce=False)
    first = run_pretrain(cfg, World(), stop_after_epoch=2)
    # what a kill during the epoch-2 checkpoint write leaves: epoch 2 logged, no checkpoint
    (first.run_dir / "epoch_0000002.pth").unlink()
    resumed = run_pretrain(cfg, World())
    assert resumed.epochs_done == 3

    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    (child,) = client.search_runs([exp.experiment_id], "tags.stage = 'pretrain'")
    assert child.info.status == "FINISHED"
    assert child.data.tags["resumed_from_epoch"] == "1"
    for key in child.data.metrics:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
        assert steps == [1, 2, 3], key  # before: 4 entries for 3 epochs
