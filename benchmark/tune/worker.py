"""The optimisation loop of one process, and the worker processes a study starts."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmark.tune import TuneError
from benchmark.tune.definition import TuneConfig
from benchmark.tune.objective import BenchmarkEvaluator, Evaluator, Objective
from benchmark.tune.storage import StudyStorage, quiet_optuna

#: How the parent starts a worker (``-c`` rather than ``-m``: one copy of this module).
WORKER_ENTRY = "import sys; from benchmark.tune.worker import worker_main; sys.exit(worker_main())"
#: Exit code of a worker that stopped because as many trials failed as TRIALS.
SYSTEMATIC_EXIT = 3
#: How long workers get to end their trials after a stop before what is left is killed.
WORKER_STOP_TIMEOUT_S = 60.0


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


def sampler_seed(seed: int, worker: int, first_number: int) -> int:
    """Distinct per worker and per call: a resumed study must not replay its first draws."""
    blob = f"{seed}:{worker}:{first_number}".encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16)


def make_sampler(tune: TuneConfig, worker: int, first_number: int) -> optuna.samplers.BaseSampler:
    seed = sampler_seed(tune.sampler["seed"], worker, first_number)
    if tune.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.sampler["n_startup_trials"])


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    if tune.pruner["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.WilcoxonPruner(
        p_threshold=tune.pruner["p_threshold"], n_startup_steps=tune.pruner["n_startup_steps"]
    )


def load_evaluator(ref: str | Evaluator | None) -> Evaluator:
    """The benchmark (None), a callable, or a ``module:function`` a worker can import."""
    if ref is None:
        return BenchmarkEvaluator()
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def counts(trials: Sequence[FrozenTrial], first_number: int) -> tuple[int, list[FrozenTrial]]:
    """(finished or running trials, trials failed in this call); an enqueued (WAITING) trial
    is a slot still to fill, which the next ``optimize`` runs first."""
    active = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    taken = sum(t.state in active for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number >= first_number]
    return taken, failed


def systematic(failed: list[FrozenTrial], trials: int) -> TuneError:
    last = failed[-1]
    why = last.user_attrs.get("error", "see the messages above")
    return TuneError(
        f"{len(failed)} trials failed in this call, as many as TRIALS={trials}: something "
        f"systematic is wrong; last failure (trial {last.number}): {why}"
    )


def optimize(spec: WorkerSpec, evaluate: str | Evaluator | None = None) -> None:
    """Run trials until the study holds ``spec.trials`` finished or running ones.

    The count and the new trial's creation happen under one lock, which the objective
    releases as soon as its trial is RUNNING: two workers never both take the last slot.
    """
    from benchmark.tracking import Tracker

    quiet_optuna()
    tune = TuneConfig.from_dict(spec.tune)
    store = StudyStorage(spec.storage, spec.storage_kind)
    study = optuna.load_study(
        study_name=spec.study,
        storage=store.open(),
        sampler=make_sampler(tune, spec.worker, spec.first_number),
        pruner=make_pruner(tune),
    )
    t = tune.tracking
    objective = Objective(
        tune,
        Tracker(t["experiment"], t["uri"], t["artifact_root"]),
        load_evaluator(evaluate),
        spec.study_run_id,
        spec.worker,
        spec.workers,
    )
    while True:
        with store.lock() as release:
            taken, failed = counts(study.get_trials(deepcopy=False), spec.first_number)
            if taken >= spec.trials:
                return
            if len(failed) >= spec.trials:
                raise systematic(failed, spec.trials)
            objective.release = release
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry of a worker process the study starts (``run_study`` with ``workers > 1``, via
    ``WORKER_ENTRY``); not a user command."""
    parser = argparse.ArgumentParser(prog="benchmark.tune.worker")
    parser.add_argument("--worker", required=True, help="WorkerSpec as JSON (internal)")
    args = parser.parse_args(argv)
    spec = WorkerSpec(**json.loads(args.worker))
    try:
        optimize(spec, spec.evaluator)
    except TuneError as exc:
        print(f"error: [worker {spec.worker}] {exc}", file=sys.stderr, flush=True)
        return SYSTEMATIC_EXIT
    except KeyboardInterrupt:
        return 130
    return 0


def gpu_slots(device: str) -> list[str]:
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


def spawn_workers(spec: WorkerSpec, device: str) -> list[int]:
    """W worker processes on this machine; worker w gets GPU ``w mod n`` if there are GPUs,
    else an equal share of the cores. Returns their exit codes.

    They run under ``benchmark.ui.supervise``, each in a session of its own: Ctrl-C, SIGTERM
    or SIGHUP to this process (or its death) hands each worker one SIGINT, so it ends its
    trial and runs as an interrupted one; what is left after ``WORKER_STOP_TIMEOUT_S`` is
    killed. A stop raises ``KeyboardInterrupt`` here (the study run ends KILLED)."""
    from benchmark.ui import supervise

    gpus = gpu_slots(device)
    cpus = os.cpu_count() or 1
    commands, envs = [], []
    for w in range(spec.workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[w % len(gpus)]
        else:
            env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // spec.workers)))
        blob = json.dumps(asdict(replace(spec, worker=w)))
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        print(f"==> starting worker {w}{where}", file=sys.stderr, flush=True)
        commands.append([sys.executable, "-c", WORKER_ENTRY, "--worker", blob])
        envs.append(env)
    result = supervise(commands, envs, interrupt=signal.SIGINT, timeout=WORKER_STOP_TIMEOUT_S)
    if result.stopped_by is not None:
        raise KeyboardInterrupt
    return result.codes


if __name__ == "__main__":
    sys.exit(worker_main())
