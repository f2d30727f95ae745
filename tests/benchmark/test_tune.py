"""Optuna studies: a target count that resumes, parallel workers, failures, pruning across
seeds, ``--best`` as a config file, config validation, and one real tiny ConCL trial with
its MLflow runs (study parent → trial → benchmark → pre-training and fine-tuning)."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from benchmark import tune
from benchmark.config import ConfigError, load_config
from benchmark.tune import (
    DEFAULT_JOURNAL,
    DEFAULT_STORAGE,
    TrialContext,
    TuneError,
    best_config_yaml,
    load_tune_config,
    resolve_storage,
    run_study,
)
from tests.benchmark._tiny import TINY_FINETUNE

WEIGHT = "method.concept_weight"


def fake_evaluate(ctx: TrialContext) -> None:
    """Per-seed values from the sampled concept weight: no training."""
    for seed in range(1, ctx.tune.seeds + 1):
        if not ctx.report(seed, 10.0 * ctx.params[WEIGHT] + 0.1 * seed):
            return


def parallel_evaluate(ctx: TrialContext) -> None:
    """Trial 0 waits until trial 1 exists: its worker is busy, so the other worker made it
    while trial 0 was running (the two workers really run in parallel)."""
    if ctx.trial.number == 0:
        deadline = time.monotonic() + 90
        while len(ctx.trial.study.get_trials(deepcopy=False)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the other worker never started a trial")
            time.sleep(0.1)
    fake_evaluate(ctx)


@pytest.fixture(scope="module")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its tables made once (migrations take seconds) and the
    experiment's artifacts in a temporary folder, not the repository's mlruns/."""
    root = tmp_path_factory.mktemp("mlflow-template")
    path = root / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment(
        "concl-bench", artifact_location=(root / "artifacts").as_uri()
    )
    return path


@pytest.fixture(autouse=True)
def _fresh_mlflow(_mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test still gets its own empty store (a copy of the template)."""
    path = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots are checked once, in the real trial's test; elsewhere they only cost time."""
    monkeypatch.setattr(tune, "write_plots", lambda study, out: [])


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def write(tmp_path: Path, text: str, name: str = "tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def runs(kind: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    return client.search_runs([exp.experiment_id], f"tags.run_kind = '{kind}'")


def by_name(kind: str) -> dict:
    return {r.info.run_name: r for r in runs(kind)}


@pytest.mark.usefixtures("no_plots")
def test_study_reaches_its_target_and_resumes_with_only_the_missing_trials(storage: str):
    numbers: list[int] = []

    def evaluate(ctx: TrialContext) -> None:
        numbers.append(ctx.trial.number)
        fake_evaluate(ctx)

    study = run_study("concl", "demo", trials=3, storage=storage, evaluate=evaluate)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    study = run_study("concl", "demo", trials=5, storage=storage, evaluate=evaluate)
    assert numbers == [0, 1, 2, 3, 4]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 5
    for t in study.trials:  # the value is the mean over the study's k=2 seeds
        assert t.value == pytest.approx(10 * t.params[WEIGHT] + 0.15)
        assert t.intermediate_values == {
            1: pytest.approx(10 * t.params[WEIGHT] + 0.1),
            2: pytest.approx(10 * t.params[WEIGHT] + 0.2),
        }
    run_study("concl", "demo", trials=5, storage=storage, evaluate=evaluate)
    assert numbers == [0, 1, 2, 3, 4]  # already there: nothing ran

    (parent,) = runs("study")
    assert parent.info.run_name == "tune concl-demo"
    assert parent.data.tags["study"] == "concl-demo"
    assert parent.data.tags["storage"] == storage
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 5
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    trials = by_name("trial")
    assert sorted(trials) == [f"trial {n}" for n in range(5)]
    for t in study.trials:
        run = trials[f"trial {t.number}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert run.data.metrics["value"] == pytest.approx(t.value)
        assert run.data.params == {k: str(v) for k, v in t.params.items()}


@pytest.mark.usefixtures("no_plots")
def test_same_study_config_samples_the_same_configurations(tmp_path: Path):
    first = run_study(
        "concl", "demo", 2, storage=f"sqlite:///{tmp_path / 'a.db'}", evaluate=fake_evaluate
    )
    second = run_study(
        "concl", "demo", 2, storage=f"sqlite:///{tmp_path / 'b.db'}", evaluate=fake_evaluate
    )
    assert [t.params for t in first.trials] == [t.params for t in second.trials]


@pytest.mark.usefixtures("no_plots")
def test_two_workers_on_one_journal_make_distinct_trials_and_never_overshoot(tmp_path: Path):
    journal = tmp_path / "optuna.journal"
    study = run_study(
        "concl",
        "demo",
        trials=3,
        workers=2,
        storage=str(journal),
        evaluate="tests.benchmark.test_tune:parallel_evaluate",
    )
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 3
    assert sorted(by_name("trial")) == ["trial 0", "trial 1", "trial 2"]


@pytest.mark.usefixtures("no_plots")
def test_a_failing_trial_is_marked_failed_and_the_study_goes_on(storage: str):
    def flaky(ctx: TrialContext) -> None:
        if ctx.trial.number == 1:
            raise RuntimeError("boom in trial 1")
        fake_evaluate(ctx)

    study = run_study("concl", "demo", trials=3, storage=storage, evaluate=flaky)
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: boom in trial 1"
    failed = by_name("trial")["trial 1"]
    assert failed.info.status == "FAILED" and failed.data.tags["state"] == "FAIL"
    assert "boom in trial 1" in failed.data.tags["error"]
    (parent,) = runs("study")
    assert parent.data.metrics["n_failed"] == 1 and parent.data.metrics["n_complete"] == 3


@pytest.mark.usefixtures("no_plots")
def test_as_many_failures_as_trials_stop_the_study(storage: str):
    def broken(ctx: TrialContext) -> None:
        raise ValueError("data missing")

    with pytest.raises(TuneError, match="2 trials failed.*ValueError: data missing"):
        run_study("concl", "demo", trials=2, storage=storage, evaluate=broken)
    (parent,) = runs("study")
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["n_failed"] == 2


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


@pytest.mark.usefixtures("no_plots")
def test_best_config_round_trips_and_a_changed_study_is_refused(tmp_path: Path, storage: str):
    study = run_study("concl", "demo", trials=2, storage=storage, evaluate=fake_evaluate)
    text = best_config_yaml("concl-demo", storage)
    best = study.best_trial
    assert "# Best configuration of Optuna study 'concl-demo'" in text
    assert f"trial {best.number} of 2" in text and f"{best.value:.4f}" in text
    path = write(tmp_path, text, "best.yaml")
    assert set(OmegaConf.load(path)) == {"method"}  # only the searched keys, nested
    cfg = load_config("concl", "demo", config_files=(path,), announce=False)
    for key, value in best.params.items():
        assert OmegaConf.select(cfg, key) == value
    assert cfg.pretrain.epochs == load_config("concl", "demo", announce=False).pretrain.epochs

    (parent,) = runs("study")
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert "best_params.yaml" in artifacts

    with pytest.raises(ConfigError, match="no study 'nope'.*concl-demo"):
        best_config_yaml("nope", storage)
    longer = write(tmp_path, "fixed:\n  pretrain.epochs: 3\n")
    with pytest.raises(ConfigError, match=r"different fixed budget \(pretrain.epochs\).*STUDY"):
        run_study("concl", "demo", 3, storage=storage, tune_files=(longer,), evaluate=fake_evaluate)
    again = run_study("concl", "demo", 3, study_name="longer", storage=storage,
                      tune_files=(longer,), evaluate=fake_evaluate)  # fmt: skip
    assert len(again.trials) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("space:\n  method.num_concept: {type: int, low: 2, high: 4}\n",
         "unknown config key 'method.num_concept'; did you mean 'method.num_concepts'"),
        ("fixed:\n  pretrain.epoch: 3\n",
         "fixed: unknown config key 'pretrain.epoch'; did you mean 'pretrain.epochs'"),
        ("space:\n  method.concept_weight: {low: 0.9, high: 0.2}\n",
         "low must be < high, got [0.9, 0.2]"),
        ("space:\n  method.concept_weight: {type: beta, low: 0.1, high: 1.0}\n",
         "unknown distribution type 'beta'"),
        ("space:\n  method.concept_weight: {high: 1.5}\n",
         "high 1.5 does not fit the config: method.concept_weight must be in [0, 1]"),
        ("space:\n  method.temperature: {low: 0.0}\n", "a log range needs low > 0"),
        ("space:\n  method.num_concepts: {type: float, low: 2, high: 4}\n",
         "is an integer config key; use type: int"),
        ("fixed:\n  finetune.seeds: 3\n", "'finetune.seeds' is set by study.seeds"),
        ("study:\n  pruner: {p_treshold: 0.2}\n", "did you mean 'p_threshold'"),
        ("space:\n  method.cluster_layer: {type: categorical, choices: [layer3, layer9]}\n",
         "choice 'layer9' does not fit the config: method.cluster_layer must be one of"),
    ],
)  # fmt: skip
def test_bad_tune_configs_fail_in_one_line(tmp_path: Path, text: str, message: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tune_config("concl", "demo", tune_files=(path,))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_method_without_a_study_and_searched_overrides_are_refused():
    with pytest.raises(ConfigError, match="method 'mocov2'.*methods with one: concl"):
        load_tune_config("mocov2", "demo")
    with pytest.raises(ConfigError, match="override 'method.num_concepts' sets a key the study"):
        load_tune_config("concl", "demo", overrides=("method.num_concepts=4",))


def test_demo_and_paper_studies_resolve():
    demo, paper = load_tune_config("concl", "demo"), load_tune_config("concl", "paper")
    assert demo.seeds == 2 and paper.seeds == 5
    assert demo.space["method.warmup_epochs"].high == 1
    assert paper.space["method.warmup_epochs"].high == 40
    assert demo.fixed["pretrain.epochs"] == 2 and paper.fixed["pretrain.epochs"] == 50
    assert set(paper.space) == {
        "method.num_concepts",
        "method.concept_temperature",
        "method.temperature",
        "method.concept_weight",
        "method.warmup_epochs",
        "method.cluster_layer",
    }
    cfg = load_config("concl", "demo", overrides=demo.base_overrides(), announce=False)
    assert list(cfg.finetune.datasets) == ["glas"] and cfg.finetune.seeds == 2


def test_storage_resolution(capsys):
    assert resolve_storage(None, 1).url == DEFAULT_STORAGE
    journal = resolve_storage(None, 2)
    assert (journal.url, journal.kind) == (DEFAULT_JOURNAL, "journal")
    assert DEFAULT_JOURNAL in capsys.readouterr().err
    with pytest.raises(ConfigError, match="SQLite does not support 3 parallel workers"):
        resolve_storage("sqlite:///x.db", 3)
    remote = resolve_storage("postgresql://tuner@db/optuna", 8)
    assert (remote.url, remote.kind, remote.local_path) == (
        "postgresql://tuner@db/optuna",
        "rdb",
        None,
    )


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
