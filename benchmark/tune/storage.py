"""Where studies live (an RDB URL or a journal file) and the lock that keeps workers from
overshooting ``TRIALS``.

Optuna's storage is kept apart from MLflow's database. One process uses SQLite; several
workers on one machine share a journal file (SQLite takes parallel writers badly); workers on
several machines share a PostgreSQL/MySQL server, where Optuna's heartbeat fails (and retries
once) the trial of a worker that stopped beating.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.config import ConfigError
from benchmark.tune import DEFAULT_JOURNAL, DEFAULT_STORAGE

if TYPE_CHECKING:  # optuna and filelock are imported where used: the CLI stays fast
    import optuna

#: Seconds between a running trial's heartbeats on a server database, and the silence after
#: which Optuna fails the trial (optuna/optuna ``optuna/storages/_rdb/storage.py``).
HEARTBEAT_INTERVAL, GRACE_PERIOD = 60, 300


@dataclass(frozen=True)
class StudyStorage:
    """Where studies live: an RDB URL (sqlite, PostgreSQL, MySQL) or a journal file."""

    url: str
    kind: str  # "rdb" or "journal"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    @property
    def local_path(self) -> Path | None:
        """The file on this machine, if the storage is one (sqlite or journal)."""
        if self.kind == "journal":
            return Path(self.url)
        if self.url.startswith("sqlite:///"):
            return Path(self.url.removeprefix("sqlite:///"))
        return None

    def exists(self) -> bool:
        path = self.local_path
        return path.is_file() if path is not None else True

    def open(self) -> optuna.storages.BaseStorage:
        import optuna

        path = self.local_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if self.is_sqlite:
            # One process on this machine: the study's dead-trial sweep covers a killed worker.
            return optuna.storages.RDBStorage(self.url)
        return optuna.storages.RDBStorage(
            self.url,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            grace_period=GRACE_PERIOD,
            **_retry_stale_trial(),
        )

    @contextmanager
    def lock(self) -> Iterator[Callable[[], None]]:
        """Exclusive across the processes of this machine for a local storage (a no-op for a
        server database); yields a release that may be called early, and again."""
        path = self.local_path
        if path is None:
            yield lambda: None
            return
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_name(path.name + ".tune-lock"))
        with lock:
            yield lock.release


def _retry_stale_trial() -> dict[str, Any]:
    """Re-queue a heartbeat-stale trial once (its worker was killed or lost its machine): its
    configuration still gets evaluated, and one that kills its worker cannot loop. The class
    and keyword were renamed in Optuna 4.9 (``RetryFailedTrialCallback`` before)."""
    import optuna

    storages = optuna.storages
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return {
            "heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        }
    return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental warnings (the Wilcoxon pruner, the
    heartbeat) would drown the study's own one-line progress."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _is_sqlite_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def journal_note(workers: int) -> str:
    """The line saying why several workers use the journal file by default."""
    return (
        f"==> WORKERS={workers}: using the journal file {DEFAULT_JOURNAL} as Optuna "
        f"storage (parallel writers; SQLite is for one process). --storage / STORAGE= "
        "chooses another (a PostgreSQL/MySQL URL for several machines)"
    )


def resolve_storage(
    storage: str | None = None, workers: int = 1, announce: bool = True
) -> StudyStorage:
    """The storage for ``--storage`` (None: the project default for ``workers``).

    One process: ``sqlite:///mlruns/optuna.db``. Several: SQLite does not take parallel
    writers well, so the default becomes the journal file ``mlruns/optuna.journal``. A URL
    (``postgresql://…``, ``mysql://…``) passes through for workers on several machines; any
    other string is a journal file path.
    """
    if storage is None:
        if workers <= 1:
            return StudyStorage(DEFAULT_STORAGE, "rdb")
        if announce:
            print(journal_note(workers), file=sys.stderr, flush=True)
        return StudyStorage(DEFAULT_JOURNAL, "journal")
    if "://" in storage:
        if storage.startswith("sqlite:") and workers > 1:
            raise ConfigError(
                f"--storage {storage}: SQLite does not support {workers} parallel workers; use a "
                f"journal file (e.g. --storage {DEFAULT_JOURNAL}) or a PostgreSQL/MySQL URL"
            )
        return StudyStorage(storage, "rdb")
    path = Path(storage)
    if path.is_dir():
        raise ConfigError(f"--storage {storage} is a directory; name a journal file or a URL")
    if path.is_file() and _is_sqlite_file(path):
        raise ConfigError(f"--storage {storage} is an SQLite database; pass sqlite:///{storage}")
    return StudyStorage(storage, "journal")


def default_storages() -> list[StudyStorage]:
    """The project's default storages that exist on this machine (``--best`` searches them)."""
    found = [StudyStorage(DEFAULT_STORAGE, "rdb"), StudyStorage(DEFAULT_JOURNAL, "journal")]
    return [s for s in found if s.exists()]
