"""A study's lifecycle: create or resume it, sweep trials of dead workers, keep its MLflow
parent run, run the workers, and summarise."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from benchmark.config import ConfigError, announce_profile, load_config, resolve_profile
from benchmark.core.errors import with_type
from benchmark.core.schema import DESCRIPTION_TAG, METHOD_TAG, RUN_KIND_TAG, STAGE_TAG, quote
from benchmark.tune import DEFAULT_STORAGE, TuneError
from benchmark.tune.best import best_config_yaml, best_trial
from benchmark.tune.definition import STUDY_ATTR, TuneConfig, prunable_after
from benchmark.tune.objective import Evaluator, fmt
from benchmark.tune.plots import state_counts, write_plots
from benchmark.tune.schema import load_tune_config
from benchmark.tune.storage import StudyStorage, journal_note, quiet_optuna, resolve_storage
from benchmark.tune.worker import WorkerSpec, counts, optimize, spawn_workers, systematic

if TYPE_CHECKING:
    from benchmark.tracking import Tracker


#: Trial user attribute marking the enqueued trial at the config's own values.
REFERENCE_ATTR = "reference_config"


def open_study(
    name: str, store: StudyStorage, tune: TuneConfig, storage: optuna.storages.BaseStorage
) -> optuna.Study:
    """Create the study in ``storage`` (opened from ``store``) or resume it, refusing one made
    with another space or budget."""
    study = optuna.create_study(
        study_name=name, storage=storage, direction=tune.direction, load_if_exists=True
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
        if tune.reference:  # the study's reference point: the recipe it starts from
            study.enqueue_trial(dict(tune.reference), user_attrs={REFERENCE_ATTR: True})
        return study
    if recorded != wanted:
        differ = differences(recorded, wanted)
        raise ConfigError(
            f"study '{name}' in {store.url} was created with a different {differ}; pick another "
            f"STUDY name (e.g. STUDY={name}-2) or restore the study's settings"
        )
    return study


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What changed between two fingerprints, in words (and which keys, for mappings)."""
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


def fail_dead_trials(
    study: optuna.Study, storage: optuna.storages.BaseStorage, tracker: Tracker
) -> list[int]:
    """RUNNING trials whose worker on this machine has died (a kill, a power cut) would hold
    a slot of TRIALS forever: mark them FAIL with an ``error`` attribute, and their MLflow runs
    FAILED; returns their numbers. ``storage`` is the study's (public ``BaseStorage`` calls set
    the attribute of a trial this process does not hold). On a server database Optuna's
    heartbeat also catches the workers of other machines (see ``storage.py``)."""
    host, why = socket.gethostname(), "its worker process ended without finishing it"
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or _alive(pid):
            continue
        study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "error", why)
        study.tell(t.number, state=TrialState.FAIL)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.set_tags(run_id, {"state": "FAIL", "error": why})
            tracker.finish(run_id, "FAILED")
        print(
            f"==> trial {t.number} was left RUNNING by a dead worker: marked FAIL", file=sys.stderr
        )
        dead.append(t.number)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def study_run(tracker: Tracker, name: str, store: StudyStorage, tune: TuneConfig) -> str:
    """The study's MLflow parent, found by (study, storage) tags or created; set RUNNING."""
    from benchmark.lineage import git_commit

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(
            f"tags.{RUN_KIND_TAG} = 'study' and tags.study = '{quote(name)}' "
            f"and tags.storage = '{quote(store.url)}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = tracker.client.create_run(
            tracker.experiment_id,
            run_name=f"tune {name}",
            tags={
                RUN_KIND_TAG: "study",
                STAGE_TAG: "study",
                "study": name,
                "storage": store.url,
                METHOD_TAG: tune.method,
                "profile": tune.profile,
                "git_commit": git_commit(),
                DESCRIPTION_TAG: _description(name, store, tune),
            },
        ).info.run_id
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


def _description(name: str, store: StudyStorage, tune: TuneConfig) -> str:
    space = "; ".join(f"`{k}` {p.describe()}" for k, p in tune.space.items())
    fixed = ", ".join(f"`{k}={v}`" for k, v in tune.fixed.items()) or "none"
    return (
        f"Optuna study **{name}** of `{tune.method}` (profile `{tune.profile}`, storage "
        f"`{store.url}`). Objective: {tune.direction} {tune.objective_label}. Each trial "
        f"is a child run `trial N` holding the benchmark it started (pre-training and "
        f"fine-tuning runs). Search space: {space}. Fixed budget of every trial: {fixed}. "
        f"Sampler: {tune.sampler['name']} (seed {tune.sampler['seed']}); pruner: "
        f"{tune.pruner['name']} over seeds. Plots and `best_params.yaml` are artifacts; "
        f"browse the study with `optuna-dashboard {store.url}`."
    )


def _prepare_data(tune: TuneConfig) -> None:
    """Generate/convert the demo's data once before W workers would race to write it."""
    from benchmark.core.contracts import World
    from benchmark.data.synthetic import write_pretrain_set
    from benchmark.transfer.finetune import prepare_dataset_for

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


def _announce(
    name: str, store: StudyStorage, tune: TuneConfig, taken: int, spec: WorkerSpec
) -> None:
    more = (
        f"; running up to {spec.trials - taken} more with {spec.workers} worker(s)"
        if taken < spec.trials
        else "; nothing to run (raise TRIALS to add trials)"
    )
    print(
        f"==> study '{name}' in {store.url}: {taken} finished or running trials of "
        f"TRIALS={spec.trials}{more}",
        file=sys.stderr,
        flush=True,
    )
    if taken < spec.trials and prunable_after(tune) is None and tune.pruner["name"] != "none":
        print(
            f"==> note: with {tune.seeds} seeds per trial and p_threshold "
            f"{tune.pruner['p_threshold']} the Wilcoxon pruner cannot stop a trial before its "
            "last seed (all s seeds worse than the best give p = 2^-s)",
            file=sys.stderr,
        )


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
    from benchmark.tracking import Tracker

    if trials < 1:
        raise ConfigError(
            "TRIALS must be >= 1 (the number of finished trials the study should hold)"
        )
    if workers < 1:
        raise ConfigError("WORKERS must be >= 1")
    if workers > 1 and evaluate is not None and not isinstance(evaluate, str):
        raise ConfigError("several workers need the evaluator as an importable 'module:function'")
    quiet_optuna()
    concrete, why = resolve_profile(profile)
    tune = load_tune_config(method, concrete, config_files, overrides, tune_files)
    name = study_name or f"{method}-{concrete}"
    store = resolve_storage(storage, workers, announce=False)
    t = tune.tracking
    tracker = Tracker(t["experiment"], t["uri"], t["artifact_root"])  # the store checked
    opened = store.open()
    study = open_study(name, store, tune, opened)
    # only now, so that a refused input prints just its error line
    announce_profile(concrete, why)
    if storage is None and workers > 1:
        print(journal_note(workers), file=sys.stderr, flush=True)
    fail_dead_trials(study, opened, tracker)
    # this call's trials: the enqueued ones still waiting (the reference point) and all new
    waiting = [t.number for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    first = min(waiting, default=len(study.trials))
    taken, _ = counts(study.trials, first)
    spec = WorkerSpec(
        tune=tune.to_dict(),
        study=name,
        storage=store.url,
        storage_kind=store.kind,
        trials=trials,
        worker=0,
        workers=workers,
        study_run_id=study_run(tracker, name, store, tune),
        first_number=first,
        evaluator=evaluate if isinstance(evaluate, str) else None,
    )
    _announce(name, store, tune, taken, spec)
    status, problem = "FAILED", None
    try:
        if taken < trials and workers == 1:
            optimize(spec, evaluate)
        elif taken < trials:
            if evaluate is None:
                _prepare_data(tune)
            cfg = load_config(
                method, concrete, tuple(config_files), tune.base_overrides(), announce=False
            )
            codes = spawn_workers(spec, cfg.pretrain.device)
            study = optuna.load_study(study_name=name, storage=store.open())
            _, failed = counts(study.trials, first)
            if len(failed) >= trials:
                raise systematic(failed, trials)
            bad = [(w, c) for w, c in enumerate(codes) if c]
            if bad:
                problem = f"worker {bad[0][0]} exited with code {bad[0][1]}; see its messages above"
        status = "FINISHED" if problem is None else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = optuna.load_study(study_name=name, storage=store.open())
        try:
            summarize(study, tracker, spec.study_run_id, store)
        except Exception as exc:  # a plot must not hide the study's own outcome
            print(f"==> note: the study summary failed: {with_type(exc)}", file=sys.stderr)
        tracker.finish(spec.study_run_id, status)
    if problem is not None:
        raise TuneError(problem)
    return study


def summarize(study: optuna.Study, tracker: Tracker, run_id: str, store: StudyStorage) -> None:
    """Counts, best value, ``best_params.yaml`` and plots on the study's parent run (a
    re-run that changed nothing logs no metric step)."""
    n = state_counts(study)
    metrics: dict[str, float] = dict(n)
    best = best_trial(study)
    if best is not None:
        metrics["best_value"] = float(best.value)
        tracker.set_tags(run_id, {"best_trial": best.number})
        tracker.log_text(run_id, best_config_yaml(study.study_name, store.url), "best_params.yaml")
    # Changed values only, at a new step: a dead trial swept to FAIL changes the counts
    # but not len(study.trials), a step the run may already hold (which the tracker drops).
    tracker.log_summary(run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(study, Path(tmp)):
            tracker.log_artifact(run_id, path, "plots")
    line = (
        f"==> study '{study.study_name}': {n['n_complete']} complete, "
        f"{n['n_pruned']} pruned, {n['n_failed']} failed"
    )
    if best is not None:
        params = ", ".join(f"{k}={fmt(v)}" for k, v in best.params.items())
        line += f"; best trial {best.number}: {best.value:.3f} with {params}"
    print(line, file=sys.stderr)
    print(
        f"==> the best configuration as a config file: concl-bench tune --best {study.study_name}"
        f"{'' if store.url == DEFAULT_STORAGE else ' --storage ' + store.url} > best.yaml; "
        f"browse the study: optuna-dashboard {store.url}",
        file=sys.stderr,
    )
