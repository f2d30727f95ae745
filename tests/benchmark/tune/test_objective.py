"""One trial: pruning across seeds, and one real tiny ConCL trial with its MLflow runs
(study parent → trial → benchmark → pre-training and fine-tuning)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from benchmark.tune.objective import TrialContext
from benchmark.tune.schema import load_tune_config
from benchmark.tune.study import run_study
from tests.benchmark._tiny import TINY_FINETUNE
from tests.benchmark.tune._helpers import by_name, runs, write


@pytest.mark.usefixtures("no_plots")
def test_wilcoxon_prunes_a_clearly_worse_trial_between_seeds(tmp_path: Path, storage: str):
    five_seeds = write(tmp_path, "study:\n  seeds: 5\n  pruner: {p_threshold: 0.15}\n")
    seen: dict[int, list[int]] = {}

    def evaluate(ctx: TrialContext) -> None:
        base = 10.0 if ctx.trial.number == 0 else 1.0
        for seed in range(1, 6):
            seen.setdefault(ctx.trial.number, []).append(seed)
            if not ctx.report(seed, base + seed):
                return

    study = run_study(
        "concl", "demo", trials=2, storage=storage, tune_files=(five_seeds,), evaluate=evaluate
    )
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and good.value == pytest.approx(13.0)
    assert bad.state == TrialState.PRUNED
    # 3 seeds all worse than the best: exact one-sided Wilcoxon p = 1/8 < 0.15
    assert bad.intermediate_values == {1: 2.0, 2: 3.0, 3: 4.0}
    assert seen[1] == [1, 2, 3]
    run = by_name("trial")["trial 1"]
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    history = MlflowClient().get_metric_history(run.info.run_id, "seed_bbox_AP")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 3.0), (3, 4.0)]
    assert "value" not in run.data.metrics


@pytest.fixture
def _keep_torch_threads():
    """The benchmark evaluator sets torch's thread count for its process: restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_keep_torch_threads")
def test_a_real_tiny_concl_trial_nests_its_benchmark_under_the_trial_run(
    tmp_path: Path, storage: str, tiny_overrides
):
    overrides = tiny_overrides(
        tmp_path / "out",
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        "method.concept_queue_size=64",
        *TINY_FINETUNE,
    )
    study = run_study("concl", "demo", trials=1, storage=storage, overrides=overrides)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert set(trial.params) == set(load_tune_config("concl", "demo").space)

    (parent,) = runs("study")
    (trial_run,) = runs("trial")
    (bench,) = runs("benchmark")
    assert trial_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trial_run.info.run_name == "trial 0" and trial_run.info.status == "FINISHED"
    assert trial_run.data.params == {k: str(v) for k, v in trial.params.items()}
    assert trial_run.data.tags["benchmark_run_id"] == bench.info.run_id
    assert bench.data.tags["mlflow.parentRunId"] == trial_run.info.run_id
    assert bench.data.tags["tune_study"] == "concl-demo" and bench.data.tags["tune_trial"] == "0"
    assert bench.info.status == "FINISHED"
    assert bench.data.tags["epochs"] == "2"  # the study's fixed budget

    seeds = [r for r in runs("finetune") if r.data.tags["mlflow.parentRunId"] == bench.info.run_id]
    assert sorted(r.data.tags["seed"] for r in seeds) == ["1", "2"]
    per_seed = {int(r.data.tags["seed"]): r.data.metrics["bbox_AP"] for r in seeds}
    assert trial.intermediate_values == pytest.approx(per_seed)
    assert trial.value == pytest.approx(statistics.fmean(per_seed.values()))
    assert trial_run.data.metrics["value"] == pytest.approx(trial.value)
    assert bench.data.metrics["glas_bbox_AP_mean"] == pytest.approx(trial.value)
    (pretrain,) = runs("pretrain")
    assert pretrain.data.tags["mlflow.parentRunId"] == bench.info.run_id
    for key, value in trial.params.items():  # the sampled values reached the pre-training
        assert pretrain.data.params[key] == str(value)

    client = MlflowClient()
    assert parent.data.metrics["best_value"] == pytest.approx(trial.value)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/slice.png"}
