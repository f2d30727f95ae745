"""``--best``: the best trial as a config file; a changed study is refused on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from benchmark.config import ConfigError, load_config
from benchmark.tune.best import best_config_yaml
from benchmark.tune.study import run_study
from tests.benchmark.tune._helpers import fake_evaluate, runs, write


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
