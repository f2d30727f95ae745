"""The validated study a worker receives: searched keys, fixed budget, objective.

``TuneConfig`` travels to worker processes as JSON (``to_dict``/``from_dict``) and turns into
the ``key=value`` overrides of each trial's experiment config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from benchmark.core.schema import DATASET_TITLES

if TYPE_CHECKING:
    import optuna

#: Study user attribute holding the fingerprint a resumed study must match.
STUDY_ATTR = "concl_bench_tune"


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

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this distribution (a trial can be enqueued at it)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

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
    #: The searched keys' values in the resolved config (the released recipe under this
    #: profile), where they lie in the space: a new study's first trial runs exactly them.
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def objective_label(self) -> str:
        title = DATASET_TITLES.get(self.dataset, self.dataset)
        return f"{title} {self.metric} (mean of {self.seeds} seed{'s' if self.seeds != 1 else ''})"

    def objective(self) -> dict[str, Any]:
        """The experiment keys the study section sets: one dataset, k seeds."""
        return {"finetune.datasets": [self.dataset], "finetune.seeds": self.seeds}

    def base_overrides(self) -> tuple[str, ...]:
        """``fixed``, the objective's dataset and seeds, then the command line (which wins)."""
        items = {**self.fixed, **self.objective()}
        return tuple(dotlist(k, v) for k, v in items.items()) + self.overrides

    def trial_overrides(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return self.base_overrides() + tuple(dotlist(k, v) for k, v in params.items())

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


def prunable_after(tune: TuneConfig) -> int | None:
    """The first seed after which ``WilcoxonPruner`` can stop a trial, or ``None``.

    The pruner (optuna/optuna ``optuna/pruners/_wilcoxon.py``) runs a one-sided Wilcoxon
    signed-rank test of the trial's per-step values against the best trial's, from
    ``max(2, n_startup_steps)`` shared steps on. With s seeds all worse than the best the exact
    p is 2^-s, so with p_threshold 0.1 a trial needs 4 reported
    seeds before it can be pruned. The last seed is never pruned: its work is done.
    """
    if tune.pruner["name"] != "wilcoxon":
        return None
    first = max(2, tune.pruner["n_startup_steps"])
    for s in range(first, tune.seeds):
        if 0.5**s < tune.pruner["p_threshold"]:
            return s
    return None


def dotlist(key: str, value: Any) -> str:
    """``key=value`` for ``load_config``: JSON is YAML, so strings stay strings."""
    return f"{key}={json.dumps(value)}"


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``: dotted keys as a config file's sections."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
