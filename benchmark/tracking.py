"""MLflow tracking: one parent run per (method, config hash), one child run per stage.

Only global rank 0 talks to MLflow: other ranks get a ``NullTracker`` whose calls do nothing,
so the stages call the tracker unconditionally. Every call goes through ``MlflowClient`` with
an explicit run id, so no process-global "active run" leaks between stages or into torchrun
children. Metrics are sent in batches (each sqlite round trip costs milliseconds). The
training loops publish events; ``MlflowMetrics`` subscribes to them; ``run_status`` ends a run
FINISHED, FAILED or KILLED.

Promises kept under faults: a store that cannot work (read-only, missing, unknown scheme,
unreachable server) stops with one ``TrackingError`` line before any work; the first start
of a fresh sqlite store is serialised across processes by a lock file beside it; every run
holds at most one entry per (metric, step), however often a stage is re-run or resumed; and
no run is left RUNNING by a failure, nor turned from FINISHED back to RUNNING by a re-run
that runs nothing.
"""

from __future__ import annotations

import errno
import math
import os
import sqlite3
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

from filelock import FileLock
from filelock import Timeout as LockTimeout
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from benchmark.config import (
    config_hash,
    finetune_hash,
    flatten,
    pretrain_hash,
    probe_hash,
    to_container,
    to_yaml,
)
from benchmark.core.contracts import World
from benchmark.core.errors import UserError, one_line
from benchmark.core.schema import (
    BACKBONE,
    BENCHMARK_KIND,
    CONFIG_HASH_TAG,
    DATASET_TITLES,
    DESCRIPTION_TAG,
    METHOD_TAG,
    PARENT_RUN_ID_TAG,
    RUN_KIND_TAG,
    STAGE_TAG,
    benchmark_filter,
    child_filter,
)
from benchmark.lineage import source_tags
from benchmark.training.loop import Callback
from benchmark.training.schedules import scaled_lr

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlruns/artifacts"
#: MLflow 3's experiment tag that picks the UI's landing view: this kind opens on the
#: training runs (the default for an untagged experiment is the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: ``<registered name>/<version>`` of the backbone a pre-training run registered.
REGISTERED_MODEL_TAG = "registered_model"
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000
#: How long a reachability check of a tracking server waits (MLflow's own client retries
#: for minutes before it gives up on a server that is not there).
SERVER_TIMEOUT_S = 5.0
#: How long a process waits for another one setting up the same sqlite store.
STORE_LOCK_TIMEOUT_S = 120.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_WHERE = "set MLFLOW_TRACKING_URI (or tracking.uri)"
_ready: set[str] = set()  # stores checked usable by this process


class TrackingError(UserError):
    """The tracking store or its artifacts cannot be used; the message says what to do."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` wins, then the config, then the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI


def tracking_uri(configured: str | None = None) -> str:
    """The resolved store (``resolve_tracking_uri``), checked usable once per process and
    set up (a sqlite store's folder made, its schema created under the store's lock), so
    that every entry point fails in one line before any work rather than minutes into it."""
    uri = resolve_tracking_uri(configured)
    if uri not in _ready:
        check_store(uri)
        _ready.add(uri)
    return uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for in-memory or other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_store(uri: str) -> None:
    """Raise ``TrackingError`` unless MLflow can use ``uri``.

    A sqlite store that cannot be written makes MLflow retry its engine ten times with
    backoff (about 100 s) before a raw ``OperationalError``, and a server that is not there
    makes its HTTP client retry for minutes; both are checked here in milliseconds. Any
    other store (an unknown scheme, a plain folder) is opened once and MLflow's refusal
    turned into one line.
    """
    scheme = urlparse(uri).scheme
    db = _sqlite_path(uri)
    if db is not None:
        _check_sqlite_file(uri, db)
    elif scheme in ("http", "https"):
        _check_server(uri)
    try:
        with store_lock(uri):
            MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow cannot use the tracking store {uri!r} ({_first_sentence(exc)}); "
            f"{_WHERE} to a sqlite:///path/mlflow.db file or an http://host:port server"
        ) from exc


def _first_sentence(exc: BaseException) -> str:
    text = one_line(exc)
    return text.split(". ", 1)[0].rstrip(".")[:300]


def _check_sqlite_file(uri: str, db: Path) -> None:
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"cannot create the folder {folder} of the tracking store {uri} "
            f"({exc.strerror or exc}); {_WHERE} to a writable place, e.g. {DEFAULT_TRACKING_URI}"
        ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(
            f"the folder {folder} of the tracking store {uri} is read-only (sqlite writes its "
            f"journal beside the database); make it writable or {_WHERE} elsewhere"
        )
    if db.exists():
        _check_sqlite_db(db)
    # last, so that a store refused above gets no lock file beside it
    if (reason := _lock_file_problem(db)) is not None:
        raise TrackingError(
            f"the folder {folder} of the tracking store {uri} is not writable (cannot create "
            f"the lock file {db}.lock: {reason}); make {folder} writable or {_WHERE} to a "
            f"writable place, e.g. {DEFAULT_TRACKING_URI}"
        )


def _check_sqlite_db(db: Path) -> None:
    """An existing store file must be a readable, writable SQLite database."""
    if not db.is_file():
        raise TrackingError(f"the tracking store {db} is not a file; {_WHERE} to a .db file")
    if not os.access(db, os.R_OK | os.W_OK):
        raise TrackingError(
            f"the tracking store {db} is read-only; make it writable (chmod u+rw) or copy it "
            f"and {_WHERE} to the copy"
        )
    with open(db, "rb") as fh:
        header = fh.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        raise TrackingError(
            f"the tracking store {db} is not an SQLite database; move it aside or {_WHERE} "
            "to another file"
        )
    try:  # what MLflow would retry for 100 s: a database sqlite cannot open or read
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=5) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        con.close()
    except sqlite3.Error as exc:
        raise TrackingError(
            f"sqlite cannot open the tracking store {db} ({exc}); repair or move it aside, "
            f"or {_WHERE} to another file"
        ) from exc


def _check_server(uri: str) -> None:
    """One request with a short timeout: any HTTP answer (even 401 or 404, or a TLS
    handshake) means a server is there; a refused or silent connection is one that is not."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # it answered; its certificate is MLflow's business (MLFLOW_TRACKING_*)
        raise TrackingError(
            f"cannot reach the MLflow server at {uri} ({reason}); start it (`make ui` serves "
            "the local store) or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from exc


def _lock_file_problem(db: Path) -> str | None:
    """Why ``<db>.lock`` cannot be created, or ``None`` when it can.

    ``os.access`` says yes to root in folders where nothing can be made (``/proc``), and
    filelock takes a lock file that cannot be created for one held by another process and
    waits its whole timeout; creating it here (kept: filelock makes it anyway) tells the two
    apart in a millisecond.
    """
    try:
        os.close(os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def store_lock(uri: str) -> AbstractContextManager[Any]:
    """A lock across processes for first-time set-up of a sqlite store (its schema, the
    experiment, find-or-create of runs): ``<db>.lock`` beside the database. Other stores
    (a server, a database server) serialise themselves; they get a no-op."""
    db = _sqlite_path(uri)
    if db is None:
        return nullcontext()
    lock = FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S)

    @contextmanager
    def held() -> Iterator[None]:
        try:
            lock.acquire()
        except LockTimeout as exc:
            if (reason := _lock_file_problem(db)) is not None:
                raise TrackingError(
                    f"cannot create the lock file {db}.lock ({reason}); make {db.parent} "
                    f"writable or {_WHERE} elsewhere"
                ) from exc
            raise TrackingError(
                f"{db}.lock is held by another process, which has been setting up the "
                f"tracking store for over {STORE_LOCK_TIMEOUT_S:.0f} s; wait for it to finish "
                "(or end it) and run again"
            ) from exc
        except OSError as exc:
            raise TrackingError(
                f"cannot create the lock file {db}.lock ({exc.strerror or exc}); make "
                f"{db.parent} writable or {_WHERE} elsewhere"
            ) from exc
        try:
            yield
        finally:
            lock.release()

    return held()


@contextmanager
def store_errors(what: str, where: str | Callable[[], str]) -> Iterator[None]:
    """Turn a full disk or a read-only place while ``what`` is written to ``where`` (or
    what ``where()`` names, asked only on a failure) into one ``TrackingError`` line; what
    was written before stays."""
    try:
        yield
    except (OSError, MlflowException) as exc:
        place = where() if callable(where) else where
        _raise_store_error(exc, what, place)
        raise


def _raise_store_error(exc: BaseException, what: str, where: str) -> None:
    """Raise the ``TrackingError`` ``exc`` means, if it is one this module knows."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            raise TrackingError(
                f"disk full while writing {what} to {where}; free space there and run the "
                "same command again (finished work is kept)"
            ) from exc
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise TrackingError(
                f"cannot write {what} to {where} ({exc.strerror}); make it writable or set "
                "tracking.artifact_root elsewhere, then run the same command again"
            ) from exc
    else:
        text = str(exc)
        if "database or disk is full" in text:
            raise TrackingError(
                f"disk full while writing {what} to the tracking store {where}; free space "
                "there and run the same command again (finished work is kept)"
            ) from exc
        if "readonly database" in text:
            raise TrackingError(
                f"the tracking store {where} became read-only while writing {what}; make it "
                "writable and run the same command again"
            ) from exc


def artifact_root_for(uri: str, configured: str | None) -> str | None:
    """Where new experiments keep artifacts: the configured folder, except that the default
    follows a sqlite store elsewhere (``sqlite:///x/mlflow.db`` → ``x/artifacts``), so a
    store pointed away from ``mlruns/`` (tests, a copy) never writes into it."""
    if configured == DEFAULT_ARTIFACT_ROOT and uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    return configured


def _default_child_name(stage: str, tags: Mapping[str, Any]) -> str:
    """``finetune glas seed 3``: the stage, then ``key value`` pairs (dataset values bare)."""
    words = [stage]
    for key, value in tags.items():
        words += [str(value)] if key in ("dataset", "method") else [key, str(value)]
    return " ".join(words)


class Tracker:
    """Find-or-create runs by tags so that re-running a command continues, never duplicates.

    It also remembers, for this process, which runs it started (so that ``run_status`` ends
    only those) and every (metric, step) each run holds (so that a resumed stage never logs
    a step twice).
    """

    def __init__(self, experiment: str, uri: str | None = None, artifact_root: str | None = None):
        self.uri = tracking_uri(uri)
        artifact_root = artifact_root_for(self.uri, artifact_root)
        self._open: dict[str, str | None] = {}  # runs started here, not ended → their parent
        self._parents: dict[str, str | None] = {}  # child → parent, as found or made here
        self._benchmarks: set[str] = set()  # parents: RUNNING only once a child starts
        self._logged: dict[str, dict[str, dict[int, float]]] = {}  # run → key → step → value
        self._source = source_tags()  # on every run made here: the UI's Source column
        with store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment, artifact_root)
        self._check_artifacts(experiment)

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        """Get or create ``name``; a process that loses the race to create it reads the
        winner's (a server store has no lock file to serialise the two)."""
        location = None
        if artifact_root and "://" not in artifact_root:
            location = Path(artifact_root).resolve().as_uri()
        for _ in range(3):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"the MLflow experiment {name!r} in {self.uri} is deleted; restore it "
                        f"(`mlflow experiments restore --experiment-id {found.experiment_id}`)"
                        " or set tracking.experiment to another name"
                    )
                if found.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version
                    self.client.set_experiment_tag(
                        found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                    )
                return found.experiment_id
            try:
                return self.client.create_experiment(
                    name,
                    artifact_location=location or artifact_root,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        raise TrackingError(f"could not create the MLflow experiment {name!r} in {self.uri}")

    def _check_artifacts(self, name: str) -> None:
        """A local artifact folder must be writable (or creatable) before any work."""
        location = self.client.get_experiment(self.experiment_id).artifact_location or ""
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            return
        folder = Path(parsed.path if parsed.scheme else location)
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            raise TrackingError(
                f"the artifact folder {folder} of MLflow experiment {name!r} cannot be written "
                "(read-only or not a folder); make it writable, or set tracking.experiment to "
                "a new name with tracking.artifact_root on a writable place"
            )

    def _lock(self) -> AbstractContextManager[Any]:
        return store_lock(self.uri)

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _created(self, run_id: str, parent_id: str | None) -> str:
        """A run made here: MLflow makes it RUNNING, so it is ours to end; no metrics yet."""
        self._open[run_id] = parent_id
        self._logged[run_id] = {}
        return run_id

    def parent_run(
        self,
        method: str,
        config_hash: str,
        tags: Mapping[str, str],
        run_name: str | None = None,
        created_tags: Mapping[str, str] | None = None,
    ) -> str:
        """The benchmark run of ``method`` at ``config_hash``, created on first use.

        ``created_tags`` are set only when the run is made here (e.g. the Optuna trial that
        asked for it, or ``mlflow.parentRunId`` to nest it under that trial). A parent found
        here is set RUNNING only when one of its children starts (``start``).
        """
        with self._lock():  # two processes starting one benchmark make one parent
            run_id = self._find(benchmark_filter(method, config_hash))
            if run_id is None:
                all_tags = {
                    **self._source,
                    RUN_KIND_TAG: BENCHMARK_KIND,
                    METHOD_TAG: method,
                    CONFIG_HASH_TAG: config_hash,
                }
                all_tags.update(tags)
                all_tags.update(created_tags or {})
                run = self.client.create_run(
                    self.experiment_id,
                    tags=all_tags,
                    run_name=run_name or f"{method}-{config_hash}",
                )
                run_id = self._created(run.info.run_id, None)
        self._benchmarks.add(run_id)
        return run_id

    def child_run(
        self, parent_id: str, stage: str, tags: Mapping[str, str], run_name: str | None = None
    ) -> tuple[str, bool]:
        """The ``stage`` child of ``parent_id`` matching ``tags``; ``True`` when newly made.

        The default name is the stage and the tag values (``finetune glas seed 3`` reads
        better in the UI's run list than ids).
        """
        with self._lock():
            run_id = self._find(child_filter(parent_id, stage, tags))
            created = run_id is None
            if created:
                all_tags = {
                    **self._source,
                    PARENT_RUN_ID_TAG: parent_id,
                    STAGE_TAG: stage,
                    RUN_KIND_TAG: stage,
                }
                all_tags.update({k: str(v) for k, v in tags.items()})
                run = self.client.create_run(
                    self.experiment_id,
                    tags=all_tags,
                    run_name=run_name or _default_child_name(stage, tags),
                )
                run_id = self._created(run.info.run_id, parent_id)
        self._parents[run_id] = parent_id
        return run_id, created

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def start(self, run_id: str | None) -> None:
        """Mark ``run_id`` RUNNING (once) and its parent with it: a parent turns RUNNING only
        when something under it actually runs."""
        if run_id is None:
            return
        if run_id not in self._open:
            self.client.update_run(run_id, status="RUNNING")
            self._open[run_id] = self._parents.get(run_id)
        parent = self._parents.get(run_id)
        if parent is not None:
            self.start(parent)

    def begin(self, run_id: str | None) -> None:
        """``start`` a stage's run (``run_status``); a benchmark parent instead waits for its
        first child, so a re-run that runs nothing leaves its status and end time alone."""
        if run_id is not None and run_id not in self._benchmarks:
            self.start(run_id)

    def set_running(self, run_id: str) -> None:
        """``start``, for callers that manage a run's status themselves (tune)."""
        self.start(run_id)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self._open.pop(run_id, None)

    def close(self, run_id: str | None, status: str) -> None:
        """End ``run_id`` as ``status`` if it was started here, and any child started here
        and left open (e.g. by a failure between opening and running it): KILLED when the
        run was, else FAILED. A run not started here (a re-run found nothing to do) keeps
        its status, except that a run whose work completed now ends FINISHED."""
        if run_id is None:
            return
        for child in [c for c, p in self._open.items() if p == run_id]:
            self.close(child, "KILLED" if status == "KILLED" else "FAILED")
        if run_id in self._open or (status == "FINISHED" and self.status(run_id) != "FINISHED"):
            self.finish(run_id, status)

    @contextmanager
    def failing(self, run_id: str | None) -> Iterator[None]:
        """Set-up of a run made or started here: on an error it ends FAILED (KILLED on
        Ctrl-C) rather than staying RUNNING."""
        try:
            yield
        except BaseException as exc:
            if run_id is not None and run_id in self._open:
                self.close(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        with store_errors("params", self.uri):
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def _history(self, run_id: str) -> dict[str, dict[int, float]]:
        """Every (key, step) ``run_id`` holds, read from the store once per process."""
        if run_id not in self._logged:
            keys = self.client.get_run(run_id).data.metrics
            self._logged[run_id] = {
                key: {m.step: m.value for m in self.client.get_metric_history(run_id, key)}
                for key in keys
            }
        return self._logged[run_id]

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``, leaving out every key the run already holds at that
        step: a resumed epoch or logging window, or a re-read result, is never a second
        entry (the first one stays)."""
        seen = self._history(run_id)
        fresh = {k: float(v) for k, v in metrics.items() if step not in seen.get(k, {})}
        if not fresh:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in fresh.items()]
        with store_errors("metrics", self.uri):
            self.client.log_batch(run_id, metrics=batch)
        for k, v in fresh.items():
            seen.setdefault(k, {})[step] = v

    def log_summary(self, run_id: str, metrics: Mapping[str, float]) -> dict[str, float]:
        """Log aggregates only where they changed: the first values at step 0, a change at
        the next step (one entry per step, the newest the run's value). Returns what was
        logged (nothing when a finished benchmark is re-run)."""
        seen = self._history(run_id)
        changed = {
            k: float(v) for k, v in metrics.items() if not _same(_latest(seen.get(k)), float(v))
        }
        if not changed:
            return {}
        steps = [max(seen[k]) for k in metrics if seen.get(k)]
        self.log_metrics(run_id, changed, max(steps) + 1 if steps else 0)
        return changed

    def log_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        """The datasets ``run_id`` used (the UI's Dataset column); one already logged on the
        run is not added again, so a re-run or resume adds nothing."""
        if inputs:
            with store_errors("dataset inputs", self.uri):
                self.client.log_inputs(run_id, datasets=inputs)

    def register_backbone(
        self, run_id: str, path: Path, name: str, tags: Mapping[str, Any]
    ) -> str | None:
        """Log ``path`` as ``run_id``'s MLflow model and register it as ``name``
        (``benchmark.registry``); the version, also tagged on the run."""
        from benchmark.registry import register_backbone

        with store_errors("the registered backbone", lambda: self._artifact_place(run_id)):
            version = register_backbone(self.uri, run_id, path, name, dict(tags))
        self.set_tags(run_id, {REGISTERED_MODEL_TAG: f"{name}/{version}"})
        return version

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        with store_errors("tags", self.uri):
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _artifact_place(self, run_id: str) -> str:
        try:
            return self.client.get_run(run_id).info.artifact_uri
        except MlflowException:
            return "the artifact store"

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        place = lambda: self._artifact_place(run_id)  # noqa: E731 (read only on a failure)
        with store_errors(f"artifact {Path(path).name}", place):
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        place = lambda: self._artifact_place(run_id)  # noqa: E731
        with store_errors(f"artifact {artifact_file}", place):
            self.client.log_text(run_id, text, artifact_file)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


def _latest(steps: Mapping[int, float] | None) -> float | None:
    return steps[max(steps)] if steps else None


def _same(old: float | None, new: float) -> bool:
    if old is None:
        return False
    return old == new or (math.isnan(old) and math.isnan(new))


def parent_run_name(label: str, epochs: Any, profile: str, external: bool = False) -> str:
    """``concl r18 ep400`` (``… demo`` on the demo profile): what the UI's run list shows."""
    words = [label, BACKBONE] if not external else [label]
    if not external and label != "random":
        words.append(f"ep{epochs}")
    if profile != "paper":
        words.append(profile)
    return " ".join(words)


def parent_description(cfg: Any, label: str, external: bool = False) -> str:
    """The parent's description (the UI's "Description" field): what this run is."""
    ft = cfg.finetune
    datasets = ", ".join(DATASET_TITLES[d] for d in ft.datasets)
    if external:
        source = f"Scores the external ResNet-18 weights `{label}`"
    elif label == "random":
        source = "Random-initialisation baseline (no pre-training)"
    else:
        source = (
            f"Benchmark of **{label}**: pre-trains ResNet-18 for {cfg.pretrain.epochs} epochs "
            f"(global batch {cfg.pretrain.batch_size}) on `{cfg.data.root}`"
        )
    return (
        f"{source}, then fine-tunes Mask R-CNN R18-FPN on {datasets} with "
        f"{ft.seeds} seed{'s' if ft.seeds != 1 else ''} each and reports COCO AP. "
        f"Profile `{cfg.profile}`, config hash `{config_hash(cfg)}` (the resolved config is "
        "the `config.yaml` artifact). The aggregate metrics `<dataset>_<bbox|segm>_AP_<mean|std>` "
        "are on this run; "
        + (
            "each fine-tuning seed is a child run."
            if external or label == "random"
            else "the pre-training and each fine-tuning seed are its child runs."
        )
    )


class ParentRun(NamedTuple):
    """A benchmark's parent run and the tracker that writes it (a ``NullTracker`` and no id
    off rank 0): what the stages of one benchmark hang their child runs under."""

    tracker: Tracker
    run_id: str | None


def open_parent(
    cfg: Any,
    label: str | None = None,
    created_tags: Mapping[str, str] | None = None,
    world: World | None = None,
) -> ParentRun:
    """The tracker and the parent run of ``cfg`` (a resolved experiment config). A parent
    found here keeps its status until a child starts (``Tracker.start``).

    The parent is keyed by (``label`` or the method, hash of the whole config), so the
    pre-training child and every fine-tuning child of one benchmark hang under one run.
    External weights pass a label naming their file's digest. ``created_tags`` go on the
    parent only if it is made here (an Optuna trial nests the parent it asked for).
    """
    if world is not None and not world.is_main:
        return ParentRun(NullTracker(), None)
    t = cfg.tracking
    tracker = Tracker(t.experiment, t.uri, t.artifact_root)
    name = label or cfg.method.name
    external = label is not None
    parent = tracker.parent_run(
        name,
        config_hash(cfg),
        {
            "epochs": str(cfg.pretrain.epochs),
            "profile": cfg.profile,
            "pretrain_hash": pretrain_hash(cfg),
        },
        run_name=parent_run_name(name, cfg.pretrain.epochs, cfg.profile, external),
        created_tags={
            DESCRIPTION_TAG: parent_description(cfg, name, external),
            **(created_tags or {}),
        },
    )
    with tracker.failing(parent):  # a new parent is RUNNING: it must not stay so
        if "config.yaml" not in {a.path for a in tracker.client.list_artifacts(parent)}:
            tracker.log_params(parent, compare_params(cfg))
            tracker.log_text(parent, to_yaml(cfg), "config.yaml")  # last: marks it complete
    return ParentRun(tracker, parent)


def compare_params(cfg: Any) -> dict[str, Any]:
    """The parent's params: what tells benchmarks apart in the UI's compare view (the
    method's hyperparameters, budget, batch, seeds); the whole config is ``config.yaml``."""
    resolved = to_container(cfg)
    params = flatten(resolved["method"], "method.")
    params.update(
        {
            "profile": cfg.profile,
            "pretrain.epochs": cfg.pretrain.epochs,
            "pretrain.batch_size": cfg.pretrain.batch_size,
            "optim.name": cfg.optim.name,
            "optim.lr": cfg.optim.lr,
            "finetune.seeds": cfg.finetune.seeds,
            "finetune.datasets": ",".join(cfg.finetune.datasets),
        }
    )
    return params


class NullTracker(Tracker):
    """The tracker of every rank but 0: each call does nothing, so stages need no rank checks."""

    def __init__(self) -> None:  # no client, no store
        self.uri, self.experiment_id = "", ""
        self._open, self._parents, self._benchmarks, self._logged = {}, {}, set(), {}

    def parent_run(self, *args: Any, **kwargs: Any) -> str | None:  # type: ignore[override]
        return None

    def child_run(self, *args: Any, **kwargs: Any) -> tuple[str | None, bool]:  # type: ignore[override]
        return None, False

    def status(self, run_id: str | None) -> str:
        return ""

    def start(self, run_id: str | None) -> None:
        pass

    def begin(self, run_id: str | None) -> None:
        pass

    def set_running(self, run_id: str | None) -> None:
        pass

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        pass

    def close(self, run_id: str | None, status: str) -> None:
        pass

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_summary(self, run_id: str | None, metrics: Mapping[str, float]) -> dict[str, float]:
        return {}

    def log_inputs(self, run_id: str | None, inputs: list[DatasetInput]) -> None:
        pass

    def register_backbone(
        self, run_id: str | None, path: Path, name: str, tags: Mapping[str, Any]
    ) -> str | None:
        return None

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(
        self, run_id: str | None, path: str | Path, artifact_path: str | None = None
    ) -> None:
        pass

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        pass

    def metric_history(self, run_id: str | None, key: str) -> list[tuple[int, float]]:
        return []


@dataclass
class RunOutcome:
    """How a stage ended when it returned normally: FINISHED, or KILLED when it stopped early
    on purpose (an interruption test, a pruned trial)."""

    status: str = "FINISHED"

    def stopped(self) -> None:
        self.status = "KILLED"


@contextmanager
def run_status(tracker: Tracker, run_id: str | None) -> Iterator[RunOutcome]:
    """Run the body as ``run_id``'s work: RUNNING from here (a benchmark parent only once a
    child starts, so a re-run that finds everything done leaves it as it was), then
    FINISHED (or as the body set it), KILLED on Ctrl-C, FAILED on an error; children left
    open under it end with it (``Tracker.close``)."""
    outcome = RunOutcome()
    status = "FAILED"
    try:
        tracker.begin(run_id)
        yield outcome
        status = outcome.status
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(run_id, status)


class MlflowMetrics(Callback):
    """Sends a training loop's metrics to one run: per epoch (pre-training) or per logging
    window (fine-tuning, keys prefixed ``train_``), and the final metrics at ``final_step``.
    A resumed loop repeats the epochs or windows after its last checkpoint; the tracker
    reads the run's history once and drops every step it already holds."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str | None,
        per_epoch: bool,
        prefix: str = "",
        final_step: int = 0,
    ) -> None:
        self.tracker, self.run_id, self.per_epoch = tracker, run_id, per_epoch
        self.prefix, self.final_step = prefix, final_step

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.per_epoch:
            self.tracker.log_metrics(
                self.run_id, {f"{self.prefix}{k}": v for k, v in metrics.items()}, step
            )

    def on_epoch_end(self, metrics: Mapping[str, float], epoch: int) -> None:
        if self.per_epoch:
            self.tracker.log_metrics(self.run_id, metrics, step=epoch)

    def on_done(self, metrics: Mapping[str, float]) -> None:
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics, step=self.final_step)


def open_pretrain_run(
    tracker: Tracker, parent_id: str | None, cfg: Any, world: World, start_epoch: int
) -> str | None:
    """The pre-training child of ``parent_id`` (made with the config's params on first use),
    tagged with the epoch it resumes from. A found child keeps its status until its
    ``run_status`` starts it; a made one is RUNNING and, if the caller fails before that,
    ends FAILED with its parent's ``run_status``."""
    digest = pretrain_hash(cfg)
    child, created = tracker.child_run(
        parent_id,
        "pretrain",
        {"method": cfg.method.name, "pretrain_hash": digest},
        run_name=f"pretrain {cfg.method.name} ep{cfg.pretrain.epochs}",
    )
    if created:
        o = cfg.optim
        params = flatten({k: v for k, v in to_container(cfg).items() if k != "finetune"})
        params.update(
            {
                "world_size": world.world_size,
                "device": world.device.type,
                "lr_scaled": scaled_lr(
                    o.lr, cfg.pretrain.batch_size, o.reference_batch, o.scale_lr
                ),
                "pretrain_hash": digest,
            }
        )
        with tracker.failing(child):
            tracker.log_params(child, params)
            tracker.log_text(child, to_yaml(cfg), "config.yaml")
    tracker.set_tags(
        child, {"resumed_from_epoch": start_epoch, "last_world_size": world.world_size}
    )
    return child


def open_finetune_run(
    tracker: Tracker,
    parent_id: str | None,
    cfg: Any,
    name: str,
    seed: int,
    weights: Any,
    scored: bool,
) -> tuple[str | None, bool]:
    """The (dataset, seed) fine-tuning child of ``parent_id``; ``True`` when it had already
    FINISHED and its metrics are on disk (``scored``): nothing to do. Otherwise the caller
    runs it under ``run_status`` (its params are logged on first use)."""
    section = to_container(cfg)["finetune"]
    params = flatten({k: v for k, v in section.items() if k not in DATASET_TITLES})
    params.update(flatten(section[name], f"{name}."))
    params.update({"weights": str(weights), "finetune_hash": finetune_hash(cfg)})
    tags = {"dataset": name, "seed": seed}
    return _open_scored_child(tracker, parent_id, "finetune", tags, params, scored)


def _open_scored_child(
    tracker: Tracker,
    parent_id: str | None,
    stage: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
    scored: bool,
) -> tuple[str | None, bool]:
    """The ``stage`` child with ``tags``: ``True`` when it had FINISHED and its result is on
    disk (``scored``); otherwise the caller runs it under ``run_status`` (``params`` are
    logged on first use)."""
    child, created = tracker.child_run(parent_id, stage, tags)
    if created:
        with tracker.failing(child):
            tracker.log_params(child, params)
    elif scored and tracker.status(child) == "FINISHED":
        return child, True
    return child, False


def open_probe_run(
    tracker: Tracker,
    parent_id: str | None,
    cfg: Any,
    dataset: str,
    probe: str,
    seed: int,
    weights: Any,
    scored: bool,
) -> tuple[str | None, bool]:
    """The (dataset, probe, seed) child of ``parent_id``, as ``open_finetune_run`` does it:
    ``True`` when it had FINISHED and its metrics are on disk (``scored``)."""
    section = to_container(cfg)["probe"]
    params = flatten({k: v for k, v in section.items() if k not in ("tissue", "dense")})
    part = "dense" if probe == "dense" else "tissue"
    params.update(flatten(section[part], f"{part}."))
    params.update({"weights": str(weights), "probe_hash": probe_hash(cfg)})
    tags = {"dataset": dataset, "probe": probe, "seed": seed}
    return _open_scored_child(tracker, parent_id, "probe", tags, params, scored)
