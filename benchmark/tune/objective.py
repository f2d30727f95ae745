"""One trial: its MLflow child run, the sampled values, the benchmark and per-seed pruning."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from benchmark.core.errors import with_type
from benchmark.core.schema import CONFIG_HASH_TAG, METHOD_TAG, PARENT_RUN_ID_TAG, benchmark_filter
from benchmark.tune.definition import TuneConfig

if TYPE_CHECKING:
    from benchmark.core.contracts import World
    from benchmark.tracking import Tracker


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
        self.world: World | None = None

    def __call__(self, ctx: TrialContext) -> None:
        from benchmark.config import config_hash, load_config
        from benchmark.pipeline import run_benchmark

        tune = ctx.tune
        cfg = load_config(
            tune.method, tune.profile, tune.config_files, ctx.overrides, announce=False
        )
        ctx.config_hash = config_hash(cfg)
        if self.world is None:
            import torch

            from benchmark.training.distributed import init_world

            self.world = init_world(cfg.pretrain.device)
            if self.world.device.type == "cpu":
                # init_world takes every core; W workers share them, and an explicit
                # OMP_NUM_THREADS wins (oversubscribed CPUs run many times slower).
                threads = os.environ.get("OMP_NUM_THREADS", "")
                share = (os.cpu_count() or 1) // ctx.workers
                torch.set_num_threads(max(1, int(threads) if threads.isdigit() else share))

        def on_seed(dataset: str, seed: int, metrics: dict[str, float]) -> bool:
            return dataset != tune.dataset or ctx.report(seed, float(metrics[tune.metric]))

        run_benchmark(cfg, self.world, on_seed=on_seed, parent_tags=ctx.parent_tags)


class Objective:
    """Optuna's objective: MLflow trial run, sampling, the evaluator, reporting, pruning.

    ``release`` is called as soon as the trial is RUNNING in the storage, where other workers
    count it: it ends the worker loop's lock (see ``worker.optimize``).
    """

    def __init__(
        self,
        tune: TuneConfig,
        tracker: Tracker,
        evaluate: Evaluator,
        study_run_id: str,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self.tune, self.tracker, self.evaluate = tune, tracker, evaluate
        self.study_run_id, self.workers = study_run_id, workers
        self.release: Callable[[], None] = lambda: None
        self.prefix = f"[worker {worker}] " if workers > 1 else ""

    def say(self, message: str) -> None:
        print(f"==> {self.prefix}{message}", file=sys.stderr, flush=True)

    def __call__(self, trial: optuna.Trial) -> float:
        self.release()
        tune, number = self.tune, trial.number
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: p.suggest(trial) for key, p in tune.space.items()}
        study_name = trial.study.study_name
        run_id, _ = self.tracker.child_run(
            self.study_run_id,
            "trial",
            {"study": study_name, "trial": number},
            run_name=f"trial {number}",
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(run_id, params)
        self.tracker.set_tags(run_id, {"state": "RUNNING", METHOD_TAG: tune.method})
        self.tracker.set_running(run_id)
        self.say(f"trial {number}: " + ", ".join(f"{k}={fmt(v)}" for k, v in params.items()))

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
                "tune_study": study_name,
                "tune_trial": str(number),
                PARENT_RUN_ID_TAG: run_id,
            },
            report=report,
            workers=self.workers,
        )
        start = time.monotonic()
        state, status = "FAIL", "FAILED"
        tags: dict[str, str] = {}
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
            tags["error"] = with_type(exc)[:5000]
            trial.set_user_attr("error", tags["error"])
            raise
        finally:
            minutes = (time.monotonic() - start) / 60
            tags.update({"state": state, "duration_min": f"{minutes:.1f}"})
            if ctx.config_hash:
                tags[CONFIG_HASH_TAG] = ctx.config_hash
                bench = benchmark_run(self.tracker, tune.method, ctx.config_hash)
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


def fmt(value: Any) -> str:
    """A sampled value for a progress line: 4 significant digits for floats."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def benchmark_run(tracker: Tracker, method: str, digest: str) -> str | None:
    """The benchmark parent run a trial's config hash maps to, if it was made."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=benchmark_filter(method, digest), max_results=1
    )
    return runs[0].info.run_id if runs else None
