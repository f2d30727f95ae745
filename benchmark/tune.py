"""Optuna studies over a method's hyper-parameters: ``concl-bench tune``.

The search space, the objective and the short fixed budget of every trial live in
``experiments/tune/<method>.yaml`` with an optional profile overlay
``experiments/tune/<profile>/<method>.yaml`` (then ``--tune-config`` files). Keys are the
dotted keys of the experiment config, so a best configuration is directly a config file.

Each trial is one in-process ``run_benchmark`` of the method with the ``fixed`` overrides
and the sampled values; its value is the mean ``<metric>`` on ``<dataset>`` over the k
fine-tuning seeds. Every seed is reported to Optuna (step = seed), so ``WilcoxonPruner``
can stop a configuration that is clearly worse than the best one before its last seeds.

Storage is Optuna's own (``sqlite:///mlruns/optuna.db``; a journal file when several
worker processes write at once; any RDB URL for workers on many machines), never MLflow's
database. MLflow holds the study parent run → one child run per trial → the benchmark's
parent run (nested by ``mlflow.parentRunId``) → its pre-training and fine-tuning runs.

``TRIALS`` is a target count of finished (complete or pruned) trials, so running again
with a larger number only adds the missing ones; every worker checks the count, running
trials included, under a file lock before it starts a trial, so workers never overshoot.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.config import (
    ConfigError,
    experiments_dir,
    flatten,
    resolve_profile,
)
from benchmark.core.schema import DATASET_TITLES

if TYPE_CHECKING:  # optuna, torch and mlflow are imported where used: the CLI stays fast
    import optuna

    from benchmark.tracking import Tracker

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DEFAULT_JOURNAL = "mlruns/optuna.journal"
#: Study user attribute holding what a resumed study must match (space, budget, objective).
STUDY_ATTR = "concl_bench_tune"
DESCRIPTION_TAG = "mlflow.note.content"
#: How the parent starts a worker (``-c`` rather than ``-m``: one copy of this module).
_WORKER_ENTRY = "import sys; from benchmark.tune import worker_main; sys.exit(worker_main())"
#: Exit code of a worker that stopped because as many trials failed as TRIALS.
_SYSTEMATIC_EXIT = 3

_PARAM_TYPES = ("int", "float", "categorical")
_SECTIONS = {
    "": ("study", "fixed", "space"),
    "study": ("direction", "objective", "seeds", "sampler", "pruner"),
    "study.objective": ("dataset", "metric"),
    "study.sampler": ("name", "seed", "n_startup_trials"),
    "study.pruner": ("name", "p_threshold", "n_startup_steps"),
}
_PARAM_FIELDS = ("type", "low", "high", "log", "step", "choices")
#: Set from the study section, so ``fixed`` may not set them.
_OBJECTIVE_KEYS = {"finetune.seeds": "study.seeds", "finetune.datasets": "study.objective.dataset"}


class TuneError(RuntimeError):
    """The study cannot go on (e.g. every trial fails); the message is one line."""


# --------------------------------------------------------------------------------------
# The tune config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchParam:
    """One searched config key and its Optuna distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def edges(self) -> list[tuple[str, Any]]:
        """The extreme values, each of which must give a valid experiment config."""
        if self.type == "categorical":
            return [("choice", c) for c in self.choices]
        cast = int if self.type == "int" else float
        return [("low", cast(self.low)), ("high", cast(self.high))]

    def describe(self) -> str:
        if self.type == "categorical":
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        scale = " log" if self.log else ""
        return f"{self.type}{scale} [{self.low}, {self.high}]"

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class TuneConfig:
    """A validated study definition: what every trial runs and what it searches."""

    method: str
    profile: str
    sources: tuple[str, ...]
    direction: str
    dataset: str
    metric: str
    seeds: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    fixed: dict[str, Any]
    space: dict[str, SearchParam]
    config_files: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    #: ``config_hash`` of the experiment config every trial starts from (fixed budget).
    base_hash: str = ""
    tracking: dict[str, Any] = field(default_factory=dict)

    @property
    def objective_label(self) -> str:
        title = DATASET_TITLES.get(self.dataset, self.dataset)
        return f"{title} {self.metric} (mean of {self.seeds} seed{'s' if self.seeds != 1 else ''})"

    def base_overrides(self) -> tuple[str, ...]:
        """``fixed``, the objective's dataset and seeds, then the command line (which wins)."""
        objective = {"finetune.datasets": [self.dataset], "finetune.seeds": self.seeds}
        items = {**self.fixed, **objective}
        return tuple(_dotlist(k, v) for k, v in items.items()) + self.overrides

    def trial_overrides(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return self.base_overrides() + tuple(_dotlist(k, v) for k, v in params.items())

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed study must match; JSON-normalised like Optuna's user attrs."""
        tree = {
            "method": self.method,
            "profile": self.profile,
            "objective": {
                "direction": self.direction,
                "dataset": self.dataset,
                "metric": self.metric,
                "seeds": self.seeds,
            },
            "fixed": self.fixed,
            "space": {k: p.to_dict() for k, p in self.space.items()},
            "base_config_hash": self.base_hash,
        }
        return json.loads(json.dumps(tree))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["space"] = {k: p.to_dict() for k, p in self.space.items()}
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> TuneConfig:
        data = dict(tree)
        data["space"] = {
            k: SearchParam(key=k, **{**v, "choices": tuple(v.get("choices", ()))})
            for k, v in data["space"].items()
        }
        for name in ("sources", "config_files", "overrides"):
            data[name] = tuple(data[name])
        return cls(**data)


def _dotlist(key: str, value: Any) -> str:
    """``key=value`` for ``load_config``: JSON is YAML, so strings stay strings."""
    return f"{key}={json.dumps(value)}"


def tune_dir() -> Path:
    return experiments_dir() / "tune"


def tunable_methods() -> list[str]:
    """Methods with a study definition (``experiments/tune/<method>.yaml``)."""
    return sorted(p.stem for p in tune_dir().glob("*.yaml"))


def _read(path: Path) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    try:
        loaded = OmegaConf.load(path)  # OmegaConf's YAML reads 1e-3 as a float, PyYAML does not
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a tune config must be a mapping with study, fixed, space")
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def _check_fields(tree: Any, section: str, source: str) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{section}' must be a mapping")
    known = _SECTIONS[section]
    for key in tree:
        if key not in known:
            where = f"{section}.{key}" if section else str(key)
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(known)})"
            raise ConfigError(f"{source}: unknown key '{where}'{extra}")
    return tree


def _layer(merged: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    """Merge one tune file into ``merged``: study sections field by field, ``fixed`` key by
    key, a ``space`` entry field by field (replaced when it names a ``type``; removed by
    ``null``)."""
    _check_fields(layer, "", source)
    study = _check_fields(layer.get("study"), "study", source)
    for name, value in study.items():
        if name in ("objective", "sampler", "pruner"):
            merged["study"].setdefault(name, {}).update(
                _check_fields(value, f"study.{name}", source)
            )
        else:
            merged["study"][name] = value
    fixed = layer.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping of config keys to values")
    merged["fixed"].update(flatten(fixed))
    space = layer.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{source}: 'space' must be a mapping of config keys to ranges")
    for key, entry in space.items():
        if entry is None:
            merged["space"].pop(key, None)
            continue
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{source}: space '{key}' must be a mapping such as "
                "{type: float, low: 0.1, high: 1.0} or {type: categorical, choices: [a, b]}"
            )
        unknown = [f for f in entry if f not in _PARAM_FIELDS]
        if unknown:
            raise ConfigError(
                f"{source}: space '{key}' has unknown field '{unknown[0]}' "
                f"(fields: {', '.join(_PARAM_FIELDS)})"
            )
        old = merged["space"].get(key)
        merged["space"][key] = dict(entry) if old is None or "type" in entry else {**old, **entry}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(key: str, entry: dict[str, Any], source: str) -> SearchParam:
    where = f"{source}: space '{key}'"
    kind = entry.get("type")
    if kind not in _PARAM_TYPES:
        raise ConfigError(
            f"{where}: unknown distribution type {kind!r}; use one of {', '.join(_PARAM_TYPES)}"
        )
    if kind == "categorical":
        extra = [f for f in ("low", "high", "log", "step") if f in entry]
        if extra:
            raise ConfigError(f"{where}: a categorical takes only 'choices', not '{extra[0]}'")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        if any(isinstance(c, dict | list) for c in choices):
            raise ConfigError(f"{where}: choices must be plain values (numbers, strings, null)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices contain duplicates")
        return SearchParam(key, kind, choices=tuple(choices))
    if "choices" in entry:
        raise ConfigError(f"{where}: 'choices' is for type categorical")
    low, high, log, step = entry.get("low"), entry.get("high"), entry.get("log", False), None
    if not _is_number(low) or not _is_number(high):
        raise ConfigError(f"{where}: needs numeric 'low' and 'high'")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: an int range needs integer bounds, got [{low}, {high}]")
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got [{low}, {high}]")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if "step" in entry:
        step = entry["step"]
        if not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise ConfigError(f"{where}: 'step' must be a positive {kind}")
        if log:
            raise ConfigError(f"{where}: 'step' and 'log: true' cannot be combined")
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return SearchParam(key, kind, low=low, high=high, log=log, step=step)


def _leaf(tree: Mapping[str, Any], key: str, where: str) -> Any:
    """The value at dotted ``key`` of a resolved config, or a one-line error with a hint."""
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = list(node) if isinstance(node, dict) else []
            prefix = ".".join(parts[:i])
            hint = difflib.get_close_matches(part, known, n=1)
            guess = f"; did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?" if hint else ""
            raise ConfigError(f"{where}: unknown config key '{key}'{guess}")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"{where}: '{key}' is a config section; name one of its keys")
    return node


def _strip_source(message: str) -> str:
    return message.removeprefix("command line: ")


def load_tune_config(
    method: str,
    profile: str = "auto",
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    tune_files: Sequence[str | Path] = (),
) -> TuneConfig:
    """The validated study definition of ``method`` on ``profile``.

    Every key of ``fixed`` and ``space`` is checked against the resolved experiment config,
    and each range's ends (each choice) must give a config that loads: a typo or an
    impossible bound fails here in one line, not in trial 17.
    """
    from benchmark.config import config_hash, load_config, to_container
    from benchmark.transfer.evaluate import METRICS

    concrete, _ = resolve_profile(profile)
    base_file = tune_dir() / f"{method}.yaml"
    if not base_file.is_file():
        have = ", ".join(tunable_methods()) or "none"
        raise ConfigError(
            f"no Optuna study defined for method '{method}' ({base_file} does not exist); "
            f"methods with one: {have}"
        )
    files = [base_file]
    overlay = tune_dir() / concrete / f"{method}.yaml"
    if overlay.is_file():
        files.append(overlay)
    for extra in tune_files:
        if not Path(extra).is_file():
            raise ConfigError(f"tune config file {extra} does not exist")
        files.append(Path(extra))
    merged: dict[str, Any] = {"study": {}, "fixed": {}, "space": {}}
    for path in files:
        _layer(merged, _read(path), str(path))
    src = " + ".join(str(p) for p in files)

    study = merged["study"]
    direction = study.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{src}: study.direction must be maximize or minimize, got {direction!r}")
    objective = study.get("objective", {})
    dataset, metric = objective.get("dataset", "glas"), objective.get("metric", "bbox_AP")
    if dataset not in DATASET_TITLES:
        raise ConfigError(f"{src}: study.objective.dataset must be glas or crag, got {dataset!r}")
    if metric not in METRICS:
        raise ConfigError(
            f"{src}: study.objective.metric must be one of {', '.join(METRICS)}, got {metric!r}"
        )
    seeds = study.get("seeds", 3)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"{src}: study.seeds (fine-tuning seeds per trial) must be an int >= 1")
    sampler = {"name": "tpe", "seed": 0, "n_startup_trials": 10, **study.get("sampler", {})}
    if sampler["name"] not in ("tpe", "random"):
        raise ConfigError(f"{src}: study.sampler.name must be tpe or random")
    for name in ("seed", "n_startup_trials"):
        value = sampler[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{src}: study.sampler.{name} must be an int >= 0")
    pruner = {
        "name": "wilcoxon",
        "p_threshold": 0.1,
        "n_startup_steps": 2,
        **study.get("pruner", {}),
    }
    if pruner["name"] not in ("wilcoxon", "none"):
        raise ConfigError(f"{src}: study.pruner.name must be wilcoxon or none")
    if not _is_number(pruner["p_threshold"]) or not 0 < pruner["p_threshold"] <= 1:
        raise ConfigError(f"{src}: study.pruner.p_threshold must be in (0, 1]")
    steps = pruner["n_startup_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"{src}: study.pruner.n_startup_steps must be an int >= 0")

    fixed: dict[str, Any] = merged["fixed"]
    for key, instead in _OBJECTIVE_KEYS.items():
        if key in fixed:
            raise ConfigError(f"{src}: fixed '{key}' is set by {instead}; remove it from fixed")
    space = {k: _param(k, v, src) for k, v in merged["space"].items()}
    if not space:
        raise ConfigError(f"{src}: the space is empty; add at least one key to search")
    both = sorted(set(space) & set(fixed))
    if both:
        raise ConfigError(f"{src}: '{both[0]}' is both fixed and searched; keep one")
    for override in overrides:
        key = override.split("=", 1)[0]
        if key in space:
            raise ConfigError(
                f"override '{key}' sets a key the study searches; remove the override or take "
                f"the key out of the space ({src})"
            )
        if key in _OBJECTIVE_KEYS:
            raise ConfigError(f"override '{key}' is set by {_OBJECTIVE_KEYS[key]} of {src}")

    def load(extra: Sequence[str]) -> Any:
        return load_config(method, concrete, tuple(config_files), tuple(extra), announce=False)

    draft = TuneConfig(
        method,
        concrete,
        tuple(map(str, files)),
        direction,
        dataset,
        metric,
        seeds,
        sampler,
        pruner,
        fixed,
        space,
        tuple(map(str, config_files)),
        tuple(overrides),
    )
    try:
        base = load(draft.base_overrides())
    except ConfigError as exc:  # name the culprit: a fixed key, a fixed value or the CLI
        tree = to_container(load(()))
        for key in fixed:
            _leaf(tree, key, f"{src}: fixed")
        try:
            load(tuple(_dotlist(k, v) for k, v in fixed.items()))
        except ConfigError as fixed_exc:
            raise ConfigError(f"{src}: fixed: {_strip_source(str(fixed_exc))}") from None
        raise exc from None
    tree = to_container(base)
    for key, param in space.items():
        current = _leaf(tree, key, f"{src}: space")
        if param.type == "float" and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{src}: space '{key}' is an integer config key; use type: int")
    _check_edges(space, lambda extra: load(draft.base_overrides() + extra), src)
    return replace(draft, base_hash=config_hash(base), tracking=tree["tracking"])


def _check_edges(
    space: Mapping[str, SearchParam], load: Callable[[tuple[str, ...]], Any], src: str
) -> None:
    """Every range end and every choice must give a valid config. All lows together, all
    highs together, then the remaining choices: a few loads instead of one per edge; only
    when a combination fails is each of its edges tried, to name the one at fault."""
    edges = {key: param.edges() for key, param in space.items()}
    rounds = max(len(e) for e in edges.values())
    for i in range(rounds):
        combo = {key: e[i] if i < len(e) else e[0] for key, e in edges.items()}
        try:
            load(tuple(_dotlist(key, value) for key, (_, value) in combo.items()))
            continue
        except ConfigError as exc:
            together = _strip_source(str(exc))
        for key, (which, value) in combo.items():
            try:
                load((_dotlist(key, value),))
            except ConfigError as exc:
                raise ConfigError(
                    f"{src}: space '{key}': {which} {value!r} does not fit the config: "
                    f"{_strip_source(str(exc))}"
                ) from None
        raise ConfigError(
            f"{src}: the space's range ends do not fit the config together: {together}"
        )


def prunable_after(tune: TuneConfig) -> int | None:
    """The first seed after which ``WilcoxonPruner`` can stop a trial, or ``None``.

    With s seeds all worse than the best trial the exact one-sided p is 2^-s, so with
    p_threshold 0.1 a trial needs 4 reported seeds before it can be pruned. The last seed is
    never pruned: its work is done.
    """
    if tune.pruner["name"] != "wilcoxon":
        return None
    first = max(2, tune.pruner["n_startup_steps"])
    for s in range(first, tune.seeds):
        if 0.5**s < tune.pruner["p_threshold"]:
            return s
    return None


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------


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
            return optuna.storages.RDBStorage(self.url)
        # Workers on many machines: a heartbeat fails the trials of a worker that died.
        return optuna.storages.RDBStorage(self.url, heartbeat_interval=60, grace_period=300)

    @contextmanager
    def lock(self) -> Iterator[_Lock]:
        path = self.local_path
        lock = _Lock(path.with_name(path.name + ".tune-lock") if path is not None else None)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()


class _Lock:
    """An exclusive ``flock`` beside a local storage file (no-op for server databases);
    ``release`` may be called early and again."""

    def __init__(self, path: Path | None) -> None:
        self.path, self._fh = path, None

    def acquire(self) -> None:
        if self.path is None:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, counting stays best effort
            return
        self._fh = open(self.path, "a")  # noqa: SIM115 - held across calls on purpose
        fcntl.flock(self._fh, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _is_sqlite_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


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
            print(
                f"==> WORKERS={workers}: using the journal file {DEFAULT_JOURNAL} as Optuna "
                f"storage (parallel writers; SQLite is for one process). --storage / STORAGE= "
                "chooses another (a PostgreSQL/MySQL URL for several machines)",
                file=sys.stderr,
                flush=True,
            )
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


# --------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What an evaluator gets: the trial, its config overrides and a per-seed reporter.

    ``report(seed, value)`` records one seed's objective value (Optuna, MLflow) and returns
    False when the pruner stops the trial: the evaluator must then skip the other seeds.
    """

    trial: optuna.Trial
    tune: TuneConfig
    params: dict[str, Any]
    overrides: tuple[str, ...]
    #: Tags for the benchmark's MLflow parent, so it nests under the trial's run.
    parent_tags: dict[str, str]
    report: Callable[[int, float], bool]
    workers: int = 1
    #: Set by the evaluator: the benchmark's config hash links the trial to its runs.
    config_hash: str | None = None
    values: dict[int, float] = field(default_factory=dict)
    pruned_after: int | None = None


#: Runs a trial's benchmark and reports each seed through ``ctx.report``.
Evaluator = Callable[[TrialContext], None]


class BenchmarkEvaluator:
    """The real objective: ``run_benchmark`` in this process, one world per process."""

    def __init__(self) -> None:
        self._world = None

    def __call__(self, ctx: TrialContext) -> None:
        from benchmark.config import config_hash, load_config
        from benchmark.pipeline import run_benchmark

        tune = ctx.tune
        cfg = load_config(
            tune.method, tune.profile, tune.config_files, ctx.overrides, announce=False
        )
        ctx.config_hash = config_hash(cfg)
        if self._world is None:
            import torch

            from benchmark.training.distributed import init_world

            self._world = init_world(cfg.pretrain.device)
            if self._world.device.type == "cpu":
                # init_world takes every core; W workers share them, and an explicit
                # OMP_NUM_THREADS wins (oversubscribed CPUs run many times slower).
                threads = os.environ.get("OMP_NUM_THREADS", "")
                share = (os.cpu_count() or 1) // ctx.workers
                torch.set_num_threads(max(1, int(threads) if threads.isdigit() else share))

        def on_seed(dataset: str, seed: int, metrics: dict[str, float]) -> bool:
            return dataset != tune.dataset or ctx.report(seed, float(metrics[tune.metric]))

        run_benchmark(cfg, self._world, on_seed=on_seed, parent_tags=ctx.parent_tags)


def _one_line(exc: BaseException) -> str:
    from benchmark.cli import one_line

    return f"{type(exc).__name__}: {one_line(exc)}"


class _Objective:
    """Optuna's objective: MLflow trial run, sampling, the evaluator, reporting, pruning."""

    def __init__(self, spec: WorkerSpec, tracker: Tracker, evaluate: Evaluator) -> None:
        self.spec, self.tracker, self.evaluate = spec, tracker, evaluate
        self.tune = TuneConfig.from_dict(spec.tune)
        self.lock: _Lock | None = None
        prefix = f"[worker {spec.worker}] " if spec.workers > 1 else ""
        self.say = lambda msg: print(f"==> {prefix}{msg}", file=sys.stderr, flush=True)

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        if self.lock is not None:  # the trial is RUNNING in the storage: others may count it
            self.lock.release()
        tune, number = self.tune, trial.number
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: p.suggest(trial) for key, p in tune.space.items()}
        run_id, _ = self.tracker.child_run(
            self.spec.study_run_id,
            "trial",
            {"study": self.spec.study, "trial": number},
            run_name=f"trial {number}",
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(run_id, params)
        self.tracker.set_tags(run_id, {"state": "RUNNING", "method": tune.method})
        self.tracker.set_running(run_id)
        self.say(f"trial {number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))

        def report(seed: int, value: float) -> bool:
            ctx.values[seed] = value
            trial.report(value, step=seed)
            self.tracker.log_metrics(run_id, {f"seed_{tune.metric}": value}, step=seed)
            self.say(f"trial {number} seed {seed}: {tune.dataset} {tune.metric} {value:.3f}")
            if len(ctx.values) < tune.seeds and trial.should_prune():
                ctx.pruned_after = seed
                return False
            return True

        ctx = TrialContext(
            trial=trial,
            tune=tune,
            params=params,
            overrides=tune.trial_overrides(params),
            parent_tags={
                "tune_study": self.spec.study,
                "tune_trial": str(number),
                "mlflow.parentRunId": run_id,
            },
            report=report,
            workers=self.spec.workers,
        )
        start = time.monotonic()
        state, status, tags = "FAIL", "FAILED", {}
        try:
            self.evaluate(ctx)
            if ctx.pruned_after is not None:
                state, status = "PRUNED", "KILLED"
                raise optuna.TrialPruned(
                    f"worse than the best trial after {len(ctx.values)} of {tune.seeds} seeds"
                )
            if len(ctx.values) < tune.seeds:
                raise RuntimeError(
                    f"the benchmark reported {len(ctx.values)} of {tune.seeds} seeds on "
                    f"{tune.dataset}"
                )
            value = statistics.fmean(ctx.values.values())
            self.tracker.log_metrics(run_id, {"value": value}, step=0)
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception as exc:
            tags["error"] = _one_line(exc)[:5000]
            trial.set_user_attr("error", tags["error"])
            raise
        finally:
            minutes = (time.monotonic() - start) / 60
            tags.update({"state": state, "duration_min": f"{minutes:.1f}"})
            if ctx.config_hash:
                tags["config_hash"] = ctx.config_hash
                bench = _benchmark_run(self.tracker, tune.method, ctx.config_hash)
                if bench:
                    tags["benchmark_run_id"] = bench
            self.tracker.set_tags(run_id, tags)
            self.tracker.finish(run_id, status)
            detail = ""
            if state == "COMPLETE":
                detail = f" (value {statistics.fmean(ctx.values.values()):.3f})"
            elif state == "PRUNED":
                detail = f" after seed {ctx.pruned_after}"
            elif "error" in tags:
                detail = f": {tags['error']}"
            self.say(f"trial {number} {state}{detail} in {minutes:.1f} min")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _benchmark_run(tracker: Tracker, method: str, digest: str) -> str | None:
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(
            f"tags.run_kind = 'benchmark' and tags.method = '{method}' "
            f"and tags.config_hash = '{digest}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------------------
# The optimisation loop of one process
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (sent as JSON on its command line)."""

    tune: dict[str, Any]
    study: str
    storage: str
    storage_kind: str
    trials: int
    worker: int
    workers: int
    study_run_id: str
    #: Trials that existed when this call started: later FAILs count as this call's.
    first_number: int
    #: ``module:function`` of an evaluator; None = the benchmark.
    evaluator: str | None = None


def _sampler_seed(seed: int, worker: int, first_number: int) -> int:
    """Distinct per worker and per call: a resumed study must not replay its first draws."""
    blob = f"{seed}:{worker}:{first_number}".encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16)


def _sampler(tune: TuneConfig, worker: int, first_number: int) -> optuna.samplers.BaseSampler:
    import optuna

    seed = _sampler_seed(tune.sampler["seed"], worker, first_number)
    if tune.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.sampler["n_startup_trials"])


def _pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    import optuna

    if tune.pruner["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.WilcoxonPruner(
        p_threshold=tune.pruner["p_threshold"], n_startup_steps=tune.pruner["n_startup_steps"]
    )


def _load_evaluator(ref: str | Evaluator | None) -> Evaluator:
    if ref is None:
        return BenchmarkEvaluator()
    if callable(ref):
        return ref
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _quiet_optuna() -> None:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _counts(trials: Sequence[optuna.trial.FrozenTrial], first_number: int) -> tuple[int, list]:
    """(finished or running trials, trials failed in this call)."""
    from optuna.trial import TrialState

    active = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    taken = sum(t.state in active for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number >= first_number]
    return taken, failed


def _systematic(failed: list, trials: int) -> TuneError:
    last = failed[-1]
    why = last.user_attrs.get("error", "see the messages above")
    return TuneError(
        f"{len(failed)} trials failed in this call, as many as TRIALS={trials}: something "
        f"systematic is wrong; last failure (trial {last.number}): {why}"
    )


def _optimize(spec: WorkerSpec, evaluate: str | Evaluator | None = None) -> None:
    """Run trials until the study holds ``spec.trials`` finished or running ones.

    The count and the new trial's creation happen under one lock, which the objective
    releases as soon as its trial is RUNNING: two workers never both take the last slot.
    """
    import optuna

    from benchmark.tracking import Tracker

    _quiet_optuna()
    tune = TuneConfig.from_dict(spec.tune)
    store = StudyStorage(spec.storage, spec.storage_kind)
    study = optuna.load_study(
        study_name=spec.study,
        storage=store.open(),
        sampler=_sampler(tune, spec.worker, spec.first_number),
        pruner=_pruner(tune),
    )
    t = tune.tracking
    objective = _Objective(
        spec, Tracker(t["experiment"], t["uri"], t["artifact_root"]), _load_evaluator(evaluate)
    )
    while True:
        with store.lock() as lock:
            taken, failed = _counts(study.get_trials(deepcopy=False), spec.first_number)
            if taken >= spec.trials:
                return
            if len(failed) >= spec.trials:
                raise _systematic(failed, spec.trials)
            objective.lock = lock
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry of a worker process the study starts (``run_study`` with ``workers > 1``):
    ``python -m benchmark.tune --worker '<WorkerSpec as JSON>'``; not a user command."""
    parser = argparse.ArgumentParser(prog="python -m benchmark.tune")
    parser.add_argument("--worker", required=True, help="WorkerSpec as JSON (internal)")
    args = parser.parse_args(argv)
    spec = WorkerSpec(**json.loads(args.worker))
    try:
        _optimize(spec, spec.evaluator)
    except TuneError as exc:
        print(f"error: [worker {spec.worker}] {exc}", file=sys.stderr, flush=True)
        return _SYSTEMATIC_EXIT
    except KeyboardInterrupt:
        return 130
    return 0


# --------------------------------------------------------------------------------------
# The study: storage, MLflow parent, workers, summary
# --------------------------------------------------------------------------------------


def _open_study(name: str, store: StudyStorage, tune: TuneConfig) -> optuna.Study:
    """Create the study or resume it, refusing one made with another space or budget."""
    import optuna

    study = optuna.create_study(
        study_name=name, storage=store.open(), direction=tune.direction, load_if_exists=True
    )
    wanted = tune.fingerprint()
    recorded = study.user_attrs.get(STUDY_ATTR)
    if recorded is None:
        if study.trials:
            raise ConfigError(
                f"study '{name}' in {store.url} was not made by concl-bench tune; "
                "pick another STUDY name"
            )
        study.set_user_attr(STUDY_ATTR, wanted)
        study.set_metric_names([tune.objective_label])
        return study
    if recorded != wanted:
        differ = _differences(recorded, wanted)
        raise ConfigError(
            f"study '{name}' in {store.url} was created with a different {differ}; pick another "
            f"STUDY name (e.g. STUDY={name}-2) or restore the study's settings"
        )
    return study


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    labels = {
        "space": "search space",
        "fixed": "fixed budget",
        "base_config_hash": "experiment config (profile, config files or overrides)",
        "objective": "objective",
        "profile": "profile",
        "method": "method",
    }
    parts = []
    for key, label in labels.items():
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            label += f" ({', '.join(keys)})"
        parts.append(label)
    return "; ".join(parts) or "definition"


def _fail_dead_trials(study: optuna.Study, store: StudyStorage, tracker: Tracker) -> None:
    """RUNNING trials whose worker on this machine has died (a kill, a power cut) would
    hold a slot of TRIALS forever: mark them FAIL, and their MLflow runs FAILED."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    storage = study._storage  # noqa: SLF001 - the public Study API cannot fail another's trial
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or _alive(pid):
            continue
        why = "its worker process ended without finishing it"
        storage.set_trial_user_attr(t._trial_id, "error", why)  # noqa: SLF001
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.set_tags(run_id, {"state": "FAIL", "error": why})
            tracker.finish(run_id, "FAILED")
        print(
            f"==> trial {t.number} was left RUNNING by a dead worker: marked FAIL", file=sys.stderr
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _study_run(tracker: Tracker, name: str, store: StudyStorage, tune: TuneConfig) -> str:
    """The study's MLflow parent, found by (study, storage) tags or created."""
    from benchmark.tracking import git_commit

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(
            f"tags.run_kind = 'study' and tags.study = '{name}' and tags.storage = '{store.url}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        run_id = runs[0].info.run_id
    else:
        space = "; ".join(f"`{k}` {p.describe()}" for k, p in tune.space.items())
        fixed = ", ".join(f"`{k}={v}`" for k, v in tune.fixed.items()) or "none"
        note = (
            f"Optuna study **{name}** of `{tune.method}` (profile `{tune.profile}`, storage "
            f"`{store.url}`). Objective: {tune.direction} {tune.objective_label}. Each trial "
            f"is a child run `trial N` holding the benchmark it started (pre-training and "
            f"fine-tuning runs). Search space: {space}. Fixed budget of every trial: {fixed}. "
            f"Sampler: {tune.sampler['name']} (seed {tune.sampler['seed']}); pruner: "
            f"{tune.pruner['name']} over seeds. Plots and `best_params.yaml` are artifacts; "
            f"browse the study with `optuna-dashboard {store.url}`."
        )
        run = tracker.client.create_run(
            tracker.experiment_id,
            run_name=f"tune {name}",
            tags={
                "run_kind": "study",
                "stage": "study",
                "study": name,
                "storage": store.url,
                "method": tune.method,
                "profile": tune.profile,
                "git_commit": git_commit(),
                DESCRIPTION_TAG: note,
            },
        )
        run_id = run.info.run_id
        tracker.log_params(run_id, {f"space.{k}": p.describe() for k, p in tune.space.items()})
        tracker.log_params(run_id, {f"fixed.{k}": v for k, v in tune.fixed.items()})
        tracker.log_params(
            run_id,
            {
                "objective": tune.objective_label,
                "direction": tune.direction,
                "sampler": json.dumps(tune.sampler),
                "pruner": json.dumps(tune.pruner),
            },
        )
    tracker.set_running(run_id)
    return run_id


def _prepare_data(tune: TuneConfig) -> None:
    """Generate/convert the demo's data once before W workers would race to write it."""
    from benchmark.config import load_config
    from benchmark.data.synthetic import write_pretrain_set
    from benchmark.transfer.finetune import prepare_dataset_for
    from methods.base import World

    cfg = load_config(
        tune.method, tune.profile, tune.config_files, tune.base_overrides(), announce=False
    )
    d = cfg.data
    if d.synthetic:
        write_pretrain_set(
            Path(d.root),
            d.synthetic_images,
            d.synthetic_size,
            d.synthetic_seed,
            list_file=d.list_file or "train.txt",
        )
    prepare_dataset_for(cfg, tune.dataset, World())


def _gpu_slots(device: str) -> list[str]:
    """CUDA device ids a worker may be pinned to (none on a CPU machine)."""
    if device == "cpu":
        return []
    import torch

    count = torch.cuda.device_count()
    if not count:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:count] if ids else [str(i) for i in range(count)]


def _spawn_workers(spec: WorkerSpec, device: str) -> list[int]:
    """W worker processes on this machine; worker w gets GPU ``w mod n`` if there are GPUs."""
    gpus = _gpu_slots(device)
    cpus = os.cpu_count() or 1
    procs = []
    for w in range(spec.workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[w % len(gpus)]
        else:
            env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // spec.workers)))
        blob = json.dumps(asdict(WorkerSpec(**{**asdict(spec), "worker": w})))
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        print(f"==> starting worker {w}{where}", file=sys.stderr, flush=True)
        procs.append(
            subprocess.Popen([sys.executable, "-c", _WORKER_ENTRY, "--worker", blob], env=env)
        )
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise


def run_study(
    method: str = "concl",
    profile: str = "auto",
    trials: int = 10,
    workers: int = 1,
    study_name: str | None = None,
    storage: str | None = None,
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    tune_files: Sequence[str | Path] = (),
    evaluate: str | Evaluator | None = None,
) -> optuna.Study:
    """Bring study ``study_name`` (default ``<method>-<profile>``) to ``trials`` finished
    trials, with ``workers`` processes; returns the study.

    ``evaluate`` replaces the benchmark (tests): a callable in this process, or a
    ``module:function`` string that worker processes can import.
    """
    import optuna

    from benchmark.tracking import Tracker

    if trials < 1:
        raise ConfigError(
            "TRIALS must be >= 1 (the number of finished trials the study should hold)"
        )
    if workers < 1:
        raise ConfigError("WORKERS must be >= 1")
    if workers > 1 and evaluate is not None and not isinstance(evaluate, str):
        raise ConfigError("several workers need the evaluator as an importable 'module:function'")
    _quiet_optuna()
    concrete, why = resolve_profile(profile)
    print(f"==> profile: {concrete} ({why})", file=sys.stderr, flush=True)
    tune = load_tune_config(method, concrete, config_files, overrides, tune_files)
    name = study_name or f"{method}-{concrete}"
    store = resolve_storage(storage, workers)
    study = _open_study(name, store, tune)
    t = tune.tracking
    tracker = Tracker(t["experiment"], t["uri"], t["artifact_root"])
    _fail_dead_trials(study, store, tracker)
    parent = _study_run(tracker, name, store, tune)
    first = len(study.trials)
    taken, _ = _counts(study.trials, first)
    print(
        f"==> study '{name}' in {store.url}: {taken} finished or running trials of TRIALS={trials}"
        + (
            f"; running up to {trials - taken} more with {workers} worker(s)"
            if taken < trials
            else "; nothing to run (raise TRIALS to add trials)"
        ),
        file=sys.stderr,
        flush=True,
    )
    if taken < trials and prunable_after(tune) is None and tune.pruner["name"] != "none":
        print(
            f"==> note: with {tune.seeds} seeds per trial and p_threshold "
            f"{tune.pruner['p_threshold']} the Wilcoxon pruner cannot stop a trial before its "
            "last seed (all s seeds worse than the best give p = 2^-s)",
            file=sys.stderr,
        )
    spec = WorkerSpec(
        tune=tune.to_dict(),
        study=name,
        storage=store.url,
        storage_kind=store.kind,
        trials=trials,
        worker=0,
        workers=workers,
        study_run_id=parent,
        first_number=first,
        evaluator=evaluate if isinstance(evaluate, str) else None,
    )
    status, problem = "FAILED", None
    try:
        if taken < trials:
            if workers == 1:
                _optimize(spec, evaluate)
            else:
                if evaluate is None:
                    _prepare_data(tune)
                from benchmark.config import load_config

                device = load_config(
                    method, concrete, tuple(config_files), tune.base_overrides(), announce=False
                ).pretrain.device
                codes = _spawn_workers(spec, device)
                study = optuna.load_study(study_name=name, storage=store.open())
                _, failed = _counts(study.trials, first)
                if len(failed) >= trials:
                    raise _systematic(failed, trials)
                bad = [(w, c) for w, c in enumerate(codes) if c]
                if bad:
                    problem = (
                        f"worker {bad[0][0]} exited with code {bad[0][1]}; see its messages above"
                    )
        status = "FINISHED" if problem is None else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = optuna.load_study(study_name=name, storage=store.open())
        try:
            summarize(study, tracker, parent, store)
        except Exception as exc:  # a plot must not hide the study's own outcome
            print(f"==> note: the study summary failed: {_one_line(exc)}", file=sys.stderr)
        tracker.finish(parent, status)
    if problem is not None:
        raise TuneError(problem)
    return study


# --------------------------------------------------------------------------------------
# Results: summary, plots, best configuration
# --------------------------------------------------------------------------------------


def _state_counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

    states = [t.state for t in study.trials]
    return {
        "n_complete": states.count(TrialState.COMPLETE),
        "n_pruned": states.count(TrialState.PRUNED),
        "n_failed": states.count(TrialState.FAIL),
    }


def summarize(study: optuna.Study, tracker: Tracker, run_id: str, store: StudyStorage) -> None:
    """Counts, best value, ``best_params.yaml`` and plots on the study's parent run."""
    counts = _state_counts(study)
    metrics: dict[str, float] = dict(counts)
    best = _best_trial(study)
    if best is not None:
        metrics["best_value"] = float(best.value)
        tracker.set_tags(run_id, {"best_trial": best.number})
        tracker.log_text(run_id, best_config_yaml(study.study_name, store.url), "best_params.yaml")
    tracker.log_metrics(run_id, metrics, step=len(study.trials))
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(study, Path(tmp)):
            tracker.log_artifact(run_id, path, "plots")
    line = (
        f"==> study '{study.study_name}': {counts['n_complete']} complete, "
        f"{counts['n_pruned']} pruned, {counts['n_failed']} failed"
    )
    if best is not None:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        line += f"; best trial {best.number}: {best.value:.3f} with {params}"
    print(line, file=sys.stderr)
    print(
        f"==> the best configuration as a config file: concl-bench tune --best {study.study_name}"
        f"{'' if store.url == DEFAULT_STORAGE else ' --storage ' + store.url} > best.yaml; "
        f"browse the study: optuna-dashboard {store.url}",
        file=sys.stderr,
    )


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, parameter importances (when computable) and slice plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.distributions import IntDistribution
    from optuna.visualization import matplotlib as ovm

    _quiet_optuna()
    n_complete = _state_counts(study)["n_complete"]
    if n_complete == 0:
        print("==> note: no complete trial yet: no plots", file=sys.stderr)
        return []
    label = (study.metric_names or ["Objective Value"])[0]
    int_params = {
        name
        for t in study.trials
        for name, dist in t.distributions.items()
        if isinstance(dist, IntDistribution)
    }
    plots: list[tuple[str, Callable[[], Any]]] = [
        (
            "optimization_history.png",
            lambda: ovm.plot_optimization_history(study, target_name=label),
        )
    ]
    if n_complete >= 2:
        plots.append(("param_importances.png", lambda: ovm.plot_param_importances(study)))
    else:
        print("==> note: parameter importances need 2 complete trials: skipped", file=sys.stderr)
    plots.append(("slice.png", lambda: ovm.plot_slice(study, target_name=label)))
    written = []
    for filename, draw in plots:
        try:
            with warnings.catch_warnings():  # a parameter with one sampled value so far
                warnings.filterwarnings("ignore", "Attempting to set identical low and high")
                axes = draw()
        except Exception as exc:  # e.g. importances of a single distinct configuration
            print(f"==> note: {filename} skipped: {_one_line(exc)}", file=sys.stderr)
            plt.close("all")
            continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = first.figure
        _tidy(filename, fig, int_params)
        fig.suptitle(f"study {study.study_name}", fontsize=10)
        path = out / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _tidy(filename: str, fig: Any, int_params: set[str]) -> None:
    """Readable as saved: room for the legend and for one panel per parameter, whole
    trial numbers, and log axes labelled 0.05 0.1 0.2 rather than crowded 10^x powers."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    if filename == "optimization_history.png":
        fig.set_size_inches(9.0, 4.8)
        fig.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    if filename == "slice.png":
        fig.set_size_inches(max(6.0, 3.4 * len(fig.axes)), 4.2)
        for ax in fig.axes:
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            elif ax.get_xlabel() in int_params:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(axis="x", labelrotation=30)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _storage_candidates(storage: str | None) -> list[StudyStorage]:
    if storage is not None:
        return [resolve_storage(storage, announce=False)]
    found = [
        s
        for s in (StudyStorage(DEFAULT_STORAGE, "rdb"), StudyStorage(DEFAULT_JOURNAL, "journal"))
        if s.exists()
    ]
    if not found:
        raise ConfigError(
            f"no Optuna storage yet ({DEFAULT_STORAGE}, {DEFAULT_JOURNAL}): run make tune first, "
            "or pass --storage / STORAGE="
        )
    return found


def best_config_yaml(study_name: str, storage: str | None = None) -> str:
    """The best trial's searched parameters as an experiment config file (nested keys),
    with a comment header naming the study, the trial and its value.

    Without ``storage`` the default SQLite database and journal file are searched.
    """
    import optuna
    import yaml

    _quiet_optuna()
    candidates = _storage_candidates(storage)
    names: dict[str, list[str]] = {}
    for store in candidates:
        if not store.exists():
            raise ConfigError(f"Optuna storage {store.url} does not exist")
        opened = store.open()
        listed = optuna.get_all_study_names(opened)
        names[store.url] = listed
        if study_name in listed:
            study = optuna.load_study(study_name=study_name, storage=opened)
            break
    else:
        where = "; ".join(f"{url}: {', '.join(n) or 'none'}" for url, n in names.items())
        raise ConfigError(f"no study '{study_name}' in the storage; studies there: {where}")
    best = _best_trial(study)
    if best is None:
        raise ConfigError(f"study '{study_name}' has no complete trial yet")
    info = study.user_attrs.get(STUDY_ATTR, {})
    objective = info.get("objective", {})
    method = info.get("method", "<method>")
    label = (
        f"mean {DATASET_TITLES.get(objective.get('dataset'), objective.get('dataset'))} "
        f"{objective.get('metric')} over {objective.get('seeds')} fine-tuning seeds"
        if objective
        else "value"
    )
    header = [
        f"# Best configuration of Optuna study '{study_name}' ({store.url}, method {method}, "
        f"profile {info.get('profile', '?')}):",
        f"# trial {best.number} of {len(study.trials)}, {label} = {best.value:.4f}.",
        "# Only the searched parameters, not the study's short budget. Run the full benchmark:",
        f"#   make benchmark METHOD={method} CONFIG=<this file>",
    ]
    body = yaml.safe_dump(_nest(best.params), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


# --------------------------------------------------------------------------------------
# Command line (wired into ``concl-bench tune``)
# --------------------------------------------------------------------------------------


def add_tune_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``tune`` sub-command on ``concl-bench``'s subparsers."""
    p = sub.add_parser(
        "tune",
        help="Optuna study of a method's hyper-parameters (experiments/tune/<method>.yaml)",
        description=(
            "Search METHOD's hyper-parameters with Optuna: every trial runs the benchmark with "
            "the study's short fixed budget and scores the mean GlaS box AP over k fine-tuning "
            "seeds; clearly worse trials are pruned between seeds. TRIALS is the number of "
            "finished trials the study should hold, so running again with a larger TRIALS adds "
            "only the missing ones. --best STUDY prints the best configuration as a config file."
        ),
    )
    p.add_argument("--method", "-m", help="method with an experiments/tune/<method>.yaml")
    p.add_argument("--trials", type=int, help="finished (complete or pruned) trials to reach")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--study", help="study name (default <method>-<profile>)")
    p.add_argument(
        "--storage",
        help=f"Optuna storage: RDB URL or journal file (default {DEFAULT_STORAGE}; "
        f"{DEFAULT_JOURNAL} with --workers > 1)",
    )
    p.add_argument(
        "--profile",
        default=os.environ.get("PROFILE", "auto"),
        help="paper | demo | auto (default: paper when real data is prepared, else demo)",
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE", help="extra experiment YAML"
    )
    p.add_argument(
        "--tune-config", action="append", default=[], metavar="FILE", help="extra tune YAML"
    )
    p.add_argument("--best", metavar="STUDY", help="print STUDY's best configuration as YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (all trials)"
    )
    return p


def tune_command(args: argparse.Namespace) -> int:
    """``concl-bench tune``; ``ConfigError`` propagates to the CLI's one-line handler."""
    if args.best:
        print(best_config_yaml(args.best, args.storage), end="")
        return 0
    if not args.method:
        raise ConfigError("name the method: --method concl (make tune METHOD=concl)")
    if args.trials is None:
        raise ConfigError("set the number of finished trials: --trials N (make tune TRIALS=N)")
    try:
        run_study(
            args.method,
            args.profile,
            args.trials,
            args.workers,
            args.study,
            args.storage,
            tuple(args.config),
            tuple(args.overrides),
            tuple(args.tune_config),
        )
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
