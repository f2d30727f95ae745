"""The study file (``experiments/tune/<method>.yaml``): its schema, layering and validation.

Layers, later wins: ``experiments/tune/<method>.yaml``, the profile's
``experiments/tune/<profile>/<method>.yaml`` if any, then ``--tune-config`` files. Each layer
is merged onto the structured schema below by ``benchmark.config.merge``, the machinery of
the experiment configs, so an unknown key or a wrong type fails naming the file and the key,
with the closest known key. Study sections merge field by field, ``fixed`` key by key, a
``space`` entry field by field (replaced when the layer names its ``type``; removed by
``null``). Value ranges that types cannot express are checked after the merge.

Then the study is checked against the experiment config it tunes: every key of ``fixed`` and
``space`` must exist there, and each range end (each choice) must give a config that loads,
so a typo or an impossible bound fails before trial 0, not in trial 17.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from benchmark.config import (
    ConfigError,
    experiments_dir,
    flatten,
    load_yaml,
    merge,
    resolve_profile,
    select_leaf,
)
from benchmark.core.schema import COCO_METRICS, DATASET_TITLES
from benchmark.tune.definition import SearchParam, TuneConfig, nest

PARAM_TYPES = ("int", "float", "categorical")
#: Set from the study section, so ``fixed`` and the command line may not set them.
OBJECTIVE_KEYS = {"finetune.seeds": "study.seeds", "finetune.datasets": "study.objective.dataset"}


@dataclass
class ObjectiveSection:
    #: A fine-tuning dataset (``glas`` or ``crag``) and one of its COCO metrics.
    dataset: str = "glas"
    metric: str = "bbox_AP"


@dataclass
class SamplerSection:
    #: ``tpe`` or ``random``.
    name: str = "tpe"
    seed: int = 0
    #: Random configurations before TPE models the results.
    n_startup_trials: int = 10


@dataclass
class PrunerSection:
    #: ``wilcoxon`` (across seeds) or ``none``.
    name: str = "wilcoxon"
    p_threshold: float = 0.1
    n_startup_steps: int = 2


@dataclass
class StudySection:
    #: ``maximize`` or ``minimize`` the objective.
    direction: str = "maximize"
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    #: Fine-tuning seeds per trial (``finetune.seeds``; ``finetune.datasets`` becomes one).
    seeds: int = 3
    sampler: SamplerSection = field(default_factory=SamplerSection)
    pruner: PrunerSection = field(default_factory=PrunerSection)


@dataclass
class ParamEntry:
    """``{type: int|float, low, high, log?, step?}`` or ``{type: categorical, choices}``; a
    layer may set single fields of an entry an earlier layer defined."""

    type: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class StudyFile:
    study: StudySection = field(default_factory=StudySection)
    #: Dotted experiment-config keys and their values for every trial (the short budget).
    fixed: dict[str, Any] = field(default_factory=dict)
    #: Dotted experiment-config keys and their distributions.
    space: dict[str, ParamEntry] = field(default_factory=dict)


def tune_dir() -> Path:
    return experiments_dir() / "tune"


def tunable_methods() -> list[str]:
    """Methods with a study definition (``experiments/tune/<method>.yaml``)."""
    return sorted(p.stem for p in tune_dir().glob("*.yaml"))


def study_files(method: str, profile: str, extra: Sequence[str | Path] = ()) -> list[Path]:
    """The layers of ``method``'s study on the concrete ``profile``, first to last."""
    base = tune_dir() / f"{method}.yaml"
    if not base.is_file():
        have = ", ".join(tunable_methods()) or "none"
        raise ConfigError(
            f"no Optuna study defined for method '{method}' ({base} does not exist); "
            f"methods with one: {have}"
        )
    files = [base]
    overlay = tune_dir() / profile / f"{method}.yaml"
    if overlay.is_file():
        files.append(overlay)
    for path in map(Path, extra):
        if not path.is_file():
            raise ConfigError(f"tune config file {path} does not exist")
        files.append(path)
    return files


def merge_layer(merged: DictConfig, path: Path) -> DictConfig:
    """One study file onto ``merged`` (see the module docstring for how entries merge)."""
    layer: dict[str, Any] = OmegaConf.to_container(load_yaml(path), resolve=False)  # type: ignore[assignment]
    layer = {k: v for k, v in layer.items() if v is not None}  # an empty section is no section
    if isinstance(layer.get("study"), dict):
        layer["study"] = {k: v for k, v in layer["study"].items() if v is not None}
    if isinstance(layer.get("fixed"), dict):
        layer["fixed"] = flatten(layer["fixed"])
    space = layer.get("space")
    if isinstance(space, dict):
        for key, entry in list(space.items()):
            if entry is None or (isinstance(entry, dict) and "type" in entry):
                merged.space.pop(key, None)
            if entry is None:
                del space[key]
    # Leaf-only hints ("did you mean 'p_threshold'"): the file's own keys are short fields.
    return merge(merged, layer, str(path), qualified=False)


def _show(value: float) -> Any:
    """A bound as written: ``4`` rather than the schema's ``4.0``."""
    return int(value) if float(value).is_integer() else value


def _param(key: str, entry: Mapping[str, Any], src: str) -> SearchParam:
    where = f"{src}: space '{key}'"
    kind = entry["type"]
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{where}: unknown distribution type {kind!r}; use one of {', '.join(PARAM_TYPES)}"
        )
    low, high, log, step = entry["low"], entry["high"], entry["log"], entry["step"]
    if kind == "categorical":
        extra = [f for f in ("low", "high", "step") if entry[f] is not None]
        extra += ["log"] if log else []
        if extra:
            raise ConfigError(f"{where}: a categorical takes only 'choices', not '{extra[0]}'")
        choices = entry["choices"]
        if not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        if any(isinstance(c, dict | list) for c in choices):
            raise ConfigError(f"{where}: choices must be plain values (numbers, strings, null)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}: choices contain duplicates")
        return SearchParam(key, kind, choices=tuple(choices))
    if entry["choices"] is not None:
        raise ConfigError(f"{where}: 'choices' is for type categorical")
    if low is None or high is None:
        raise ConfigError(f"{where}: needs numeric 'low' and 'high'")
    shown = f"[{_show(low)}, {_show(high)}]"
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: an int range needs integer bounds, got {shown}")
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got {shown}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {_show(low)}")
    if step is not None:
        if step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise ConfigError(f"{where}: 'step' must be a positive {kind}")
        if log:
            raise ConfigError(f"{where}: 'step' and 'log: true' cannot be combined")
    cast = int if kind == "int" else float
    return SearchParam(
        key, kind, cast(low), cast(high), log, cast(step) if step is not None else None
    )


def _check_study(study: Mapping[str, Any], src: str) -> None:
    """The study section's values that its types cannot express."""
    objective, sampler, pruner = study["objective"], study["sampler"], study["pruner"]
    direction, dataset, metric = study["direction"], objective["dataset"], objective["metric"]
    checks = [
        (
            direction in ("maximize", "minimize"),
            f"study.direction must be maximize or minimize, got {direction!r}",
        ),
        (
            dataset in DATASET_TITLES,
            f"study.objective.dataset must be glas or crag, got {dataset!r}",
        ),
        (
            metric in COCO_METRICS,
            f"study.objective.metric must be one of {', '.join(COCO_METRICS)}, got {metric!r}",
        ),
        (study["seeds"] >= 1, "study.seeds (fine-tuning seeds per trial) must be an int >= 1"),
        (sampler["name"] in ("tpe", "random"), "study.sampler.name must be tpe or random"),
        (sampler["seed"] >= 0, "study.sampler.seed must be an int >= 0"),
        (sampler["n_startup_trials"] >= 0, "study.sampler.n_startup_trials must be an int >= 0"),
        (pruner["name"] in ("wilcoxon", "none"), "study.pruner.name must be wilcoxon or none"),
        (0 < pruner["p_threshold"] <= 1, "study.pruner.p_threshold must be in (0, 1]"),
        (pruner["n_startup_steps"] >= 0, "study.pruner.n_startup_steps must be an int >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{src}: {message}")


def read_study(
    method: str, profile: str, overrides: Sequence[str] = (), tune_files: Sequence[str | Path] = ()
) -> TuneConfig:
    """The study files of ``method`` on the concrete ``profile``, merged and checked on their
    own (not yet against the experiment config)."""
    files = study_files(method, profile, tune_files)
    merged = OmegaConf.structured(StudyFile)
    for path in files:
        merged = merge_layer(merged, path)
    tree: dict[str, Any] = OmegaConf.to_container(merged, resolve=False)  # type: ignore[assignment]
    src = " + ".join(str(p) for p in files)
    study, fixed = tree["study"], tree["fixed"]
    _check_study(study, src)
    for key, instead in OBJECTIVE_KEYS.items():
        if key in fixed:
            raise ConfigError(f"{src}: fixed '{key}' is set by {instead}; remove it from fixed")
    space = {k: _param(k, v, src) for k, v in tree["space"].items()}
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
        if key in OBJECTIVE_KEYS:
            raise ConfigError(f"override '{key}' is set by {OBJECTIVE_KEYS[key]} of {src}")
    return TuneConfig(
        method=method,
        profile=profile,
        sources=tuple(map(str, files)),
        direction=study["direction"],
        dataset=study["objective"]["dataset"],
        metric=study["objective"]["metric"],
        seeds=study["seeds"],
        sampler=study["sampler"],
        pruner=study["pruner"],
        fixed=fixed,
        space=space,
        overrides=tuple(overrides),
    )


def load_tune_config(
    method: str,
    profile: str = "auto",
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    tune_files: Sequence[str | Path] = (),
) -> TuneConfig:
    """The validated study definition of ``method`` on ``profile`` (see the module docstring).

    The experiment config is loaded with the study's ``fixed`` and objective keys as layers
    named after the study files, between the ``--config`` files and the command line.
    """
    from benchmark.config import config_hash, load_config, to_container

    concrete, _ = resolve_profile(profile)
    draft = read_study(method, concrete, overrides, tune_files)
    draft = replace(draft, config_files=tuple(map(str, config_files)))
    src = " + ".join(draft.sources)
    fixed_layer = (f"{src}: fixed", nest(draft.fixed))
    layers = [fixed_layer, (f"{src}: study", nest(draft.objective()))]

    def load(extra: Sequence[tuple[str, Mapping[str, Any]]], cli: bool = True) -> Any:
        overrides = draft.overrides if cli else ()
        return load_config(
            method, concrete, draft.config_files, overrides, announce=False, extra_layers=extra
        )

    try:
        base = load(layers)
    except ConfigError as exc:
        if not str(exc).startswith(src):  # a value check names no layer: is it ``fixed``'s?
            try:
                load([fixed_layer], cli=False)
            except ConfigError as fixed_exc:
                raise ConfigError(f"{src}: fixed: {fixed_exc}") from None
        raise
    reference: dict[str, Any] = {}
    for key, param in draft.space.items():
        current = select_leaf(base, key, f"{src}: space")
        if param.type == "float" and isinstance(current, int) and not isinstance(current, bool):
            raise ConfigError(f"{src}: space '{key}' is an integer config key; use type: int")
        if param.contains(current):
            reference[key] = current
    _check_edges(draft.space, lambda edge: load([*layers, (_EDGES, nest(edge))]), src)
    return replace(
        draft,
        base_hash=config_hash(base),
        tracking=to_container(base)["tracking"],
        reference=reference,
    )


#: The source of the layer holding range ends (stripped from the messages it causes).
_EDGES = "space"


def _check_edges(
    space: Mapping[str, SearchParam], load: Callable[[dict[str, Any]], Any], src: str
) -> None:
    """Every range end and every choice must give a valid config. All lows together, all
    highs together, then the remaining choices: a few loads instead of one per edge; only
    when a combination fails is each of its edges tried, to name the one at fault."""
    edges = {key: param.edges() for key, param in space.items()}
    for i in range(max(len(e) for e in edges.values())):
        combo = {key: e[i] if i < len(e) else e[0] for key, e in edges.items()}
        try:
            load({key: value for key, (_, value) in combo.items()})
            continue
        except ConfigError as exc:
            together = str(exc).removeprefix(f"{_EDGES}: ")
        for key, (which, value) in combo.items():
            try:
                load({key: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"{src}: space '{key}': {which} {value!r} does not fit the config: "
                    f"{str(exc).removeprefix(f'{_EDGES}: ')}"
                ) from None
        raise ConfigError(
            f"{src}: the space's range ends do not fit the config together: {together}"
        )
