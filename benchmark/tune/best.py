"""``concl-bench tune --best STUDY``: the best trial's parameters as an experiment config file."""

from __future__ import annotations

import optuna
import yaml

from benchmark.config import ConfigError
from benchmark.core.schema import DATASET_TITLES
from benchmark.tune import DEFAULT_JOURNAL, DEFAULT_STORAGE
from benchmark.tune.definition import STUDY_ATTR, nest
from benchmark.tune.storage import StudyStorage, default_storages, quiet_optuna, resolve_storage


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial yet
        return None


def _candidates(storage: str | None) -> list[StudyStorage]:
    if storage is not None:
        return [resolve_storage(storage, announce=False)]
    found = default_storages()
    if not found:
        raise ConfigError(
            f"no Optuna storage yet ({DEFAULT_STORAGE}, {DEFAULT_JOURNAL}): run make tune first, "
            "or pass --storage / STORAGE="
        )
    return found


def find_study(study_name: str, storage: str | None = None) -> tuple[optuna.Study, StudyStorage]:
    """Study ``study_name`` in ``storage`` (None: the default SQLite database, then the
    default journal file), and where it was found."""
    names: dict[str, list[str]] = {}
    for store in _candidates(storage):
        if not store.exists():
            raise ConfigError(f"Optuna storage {store.url} does not exist")
        opened = store.open()
        listed = optuna.get_all_study_names(opened)
        names[store.url] = listed
        if study_name in listed:
            return optuna.load_study(study_name=study_name, storage=opened), store
    where = "; ".join(f"{url}: {', '.join(n) or 'none'}" for url, n in names.items())
    raise ConfigError(f"no study '{study_name}' in the storage; studies there: {where}")


def best_config_yaml(study_name: str, storage: str | None = None) -> str:
    """The best trial's searched parameters as an experiment config file (nested keys),
    with a comment header naming the study, the trial and its value.

    Without ``storage`` the default SQLite database and journal file are searched.
    """
    quiet_optuna()
    study, store = find_study(study_name, storage)
    best = best_trial(study)
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
    body = yaml.safe_dump(nest(best.params), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body
