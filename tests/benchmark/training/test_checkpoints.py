from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark.training.checkpoints import CheckpointManager, load_checkpoint


def test_one_naming_scheme_for_both_units(tmp_path: Path):
    assert CheckpointManager(tmp_path, "epoch").path(2).name == "epoch_0000002.pth"
    assert CheckpointManager(tmp_path, "iter").path(100).name == "iter_0000100.pth"
    with pytest.raises(ValueError, match="unknown checkpoint unit"):
        CheckpointManager(tmp_path, "step")


def test_latest_is_the_highest_count_and_earlier_names_still_resume(tmp_path: Path):
    manager = CheckpointManager(tmp_path, "iter")
    assert manager.latest() is None
    torch.save({"iteration": 50}, tmp_path / "model_0000050.pth")  # name before the manager
    manager.save({"iteration": 25}, 25)
    assert manager.latest() == tmp_path / "model_0000050.pth"
    manager.save({"iteration": 75}, 75)
    assert [n for n, _ in manager.found()] == [25, 50, 75]
    assert load_checkpoint(manager.latest())["iteration"] == 75
    # another unit's files are not this manager's
    torch.save({}, tmp_path / "epoch_0000099.pth")
    assert manager.latest() == tmp_path / "iter_0000075.pth"
    epochs = CheckpointManager(tmp_path, "epoch")
    torch.save({}, tmp_path / "epoch_0100.pth")
    assert epochs.latest() == tmp_path / "epoch_0100.pth"


def test_only_the_writer_writes(tmp_path: Path):
    reader = CheckpointManager(tmp_path / "run", "epoch", writer=False)
    assert reader.save({"epoch": 1}, 1) is None
    assert not (tmp_path / "run").exists()
