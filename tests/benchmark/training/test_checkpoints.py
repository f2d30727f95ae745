from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from benchmark.training.checkpoints import (
    CheckpointError,
    CheckpointManager,
    DiskFullError,
    atomic_write,
    load_checkpoint,
    remove_stale_temps,
    save_json,
)


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


def test_prune_keeps_the_newest_checkpoints_only(tmp_path: Path):
    manager = CheckpointManager(tmp_path, "iter")
    for n in (2, 4, 5):
        manager.save({"iteration": n}, n)
    (tmp_path / "metrics.json").write_text("{}")
    assert CheckpointManager(tmp_path, "iter", writer=False).prune() == []
    assert manager.prune() == [manager.path(2), manager.path(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005.pth", "metrics.json"]
    assert manager.prune() == []


def test_writer_removes_what_killed_writes_left_and_nothing_else(tmp_path: Path):
    killed = [tmp_path / ".epoch_0000002.pth.k3_9xq0a.tmp", tmp_path / ".done.json.abcdefgh.tmp"]
    kept = [
        tmp_path / "epoch_0000001.pth",
        tmp_path / ".epoch_0000002.pth.short.tmp",  # not mkstemp's 8 characters
        tmp_path / "notes.tmp",
        tmp_path / ".hidden",
    ]
    for p in (*killed, *kept):
        p.write_bytes(b"x")
    CheckpointManager(tmp_path, "epoch", writer=False)  # a reader (rank > 0) touches nothing
    assert all(p.exists() for p in killed)
    CheckpointManager(tmp_path, "epoch")
    assert not any(p.exists() for p in killed)
    assert all(p.exists() for p in kept)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_name_from_atomic_write_matches_the_stale_pattern(tmp_path: Path, monkeypatch):
    seen: list[str] = []

    def record(tmp: str) -> None:
        seen.append(Path(tmp).name)
        raise KeyboardInterrupt  # a kill while writing, before the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "epoch_0000003.pth", record)
    (tmp_path / seen[0]).write_bytes(b"half")  # what a kill -9 (no cleanup) leaves
    assert remove_stale_temps(tmp_path) == [tmp_path / seen[0]]


def test_a_checkpoint_that_is_not_a_dict_is_one_clear_error(tmp_path: Path):
    torch.save([1, 2], tmp_path / "epoch_0000001.pth")
    with pytest.raises(CheckpointError, match=r"holds a list, not a training checkpoint; move"):
        load_checkpoint(tmp_path / "epoch_0000001.pth")
    torch.save({"epoch": 1}, tmp_path / "epoch_0000002.pth")
    with pytest.raises(CheckpointError, match="lacks model, optimizer: not a checkpoint"):
        load_checkpoint(tmp_path / "epoch_0000002.pth", required=("epoch", "model", "optimizer"))


@pytest.mark.parametrize("kind", ["checkpoint", "json"])
def test_disk_full_says_so_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch, kind: str):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / ("iter_0000002.pth" if kind == "checkpoint" else "metrics.json")
    with pytest.raises(DiskFullError) as err:
        if kind == "checkpoint":
            CheckpointManager(tmp_path, "iter").save({"iteration": 2}, 2)
        else:
            save_json({"bbox_AP": 1.0}, target)
    assert str(err.value) == (
        f"disk full while writing {target}: free space under {tmp_path} (finished fine-tunes' "
        "iter_*.pth checkpoints can be deleted) and run the same command again"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_inside_torch_save_is_an_os_error(tmp_path: Path):
    # /dev/full fails every write with ENOSPC, as a full disk does
    with pytest.raises(OSError) as err, open("/dev/full", "wb") as fh:
        torch.save({"w": torch.zeros(4096)}, fh)
    assert err.value.errno == errno.ENOSPC
