"""Storage resolution, the workers' lock and the heartbeat's retry on server databases."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from benchmark.config import ConfigError
from benchmark.tune import DEFAULT_JOURNAL, DEFAULT_STORAGE
from benchmark.tune.storage import StudyStorage, _retry_stale_trial, resolve_storage


def test_storage_resolution(capsys):
    assert resolve_storage(None, 1).url == DEFAULT_STORAGE
    journal = resolve_storage(None, 2)
    assert (journal.url, journal.kind) == (DEFAULT_JOURNAL, "journal")
    assert DEFAULT_JOURNAL in capsys.readouterr().err
    with pytest.raises(ConfigError, match="SQLite does not support 3 parallel workers"):
        resolve_storage("sqlite:///x.db", 3)
    remote = resolve_storage("postgresql://tuner@db/optuna", 8)
    assert (remote.url, remote.kind, remote.local_path) == (
        "postgresql://tuner@db/optuna",
        "rdb",
        None,
    )


def test_lock_is_a_file_beside_the_storage_and_can_be_released_early(tmp_path: Path):
    store = StudyStorage(str(tmp_path / "optuna.journal"), "journal")
    other = StudyStorage(str(tmp_path / "optuna.journal"), "journal")
    with store.lock() as release:
        assert (tmp_path / "optuna.journal.tune-lock").exists()
        release()
        release()  # again: a no-op
        with other.lock():  # another holder gets it once released
            pass
    with StudyStorage("postgresql://tuner@db/optuna", "rdb").lock() as release:
        release()  # server databases: nothing to lock on this machine


def test_the_stale_trial_retry_fits_this_optuna(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name or keyword
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{tmp_path / 'hb.db'}",
            heartbeat_interval=60,
            grace_period=300,
            **_retry_stale_trial(),
        )
    assert storage.get_heartbeat_interval() == 60
