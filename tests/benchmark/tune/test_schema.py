"""The study file: layering, one-line errors naming file and key, checks against the
experiment config."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.config import ConfigError, config_hash, load_config
from benchmark.tune.schema import load_tune_config
from tests.benchmark.tune._helpers import write


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("study:\n  seeds: many\n",
         "tune.yaml: wrong type for config key 'study.seeds'"),
        ("studdy:\n  seeds: 2\n",
         "tune.yaml: unknown config key 'studdy'; did you mean 'study'?"),
        ("space:\n  method.concept_weight: {tipe: float}\n",
         "tune.yaml: unknown config key 'space.method.concept_weight.tipe'; did you mean 'type'?"),
        ("space:\n  method.concept_weight: {low: big}\n",
         "tune.yaml: wrong type for config key 'space.method.concept_weight.low'"),
        ("fixed:\n  pretrain.epochs: 0\n", "fixed: pretrain.epochs must be >= 1"),
        ("study:\n  direction: up\n", "study.direction must be maximize or minimize, got 'up'"),
        ("study:\n  pruner: {p_threshold: 0}\n", "study.pruner.p_threshold must be in (0, 1]"),
        ("space:\n  method.warmup_epochs: {type: int, low: 0, high: 2.5}\n",
         "an int range needs integer bounds, got [0, 2.5]"),
    ],
)  # fmt: skip
def test_study_file_errors_read_like_config_errors(tmp_path: Path, text: str, message: str):
    """The schema machinery of the experiment configs: file, key and a did-you-mean."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tune_config("concl", "demo", tune_files=(path,))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_layers_merge_entries_field_by_field_replace_on_type_and_drop_on_null(tmp_path: Path):
    path = write(
        tmp_path,
        "fixed:\n  pretrain: {epochs: 3}\n"
        "space:\n"
        "  method.temperature: {high: 0.2}\n"
        "  method.concept_weight: {type: categorical, choices: [0.5, 1.0]}\n"
        "  method.cluster_layer: null\n",
    )
    tune = load_tune_config("concl", "demo", tune_files=(path,))
    assert tune.fixed["pretrain.epochs"] == 3  # nested keys are dotted ones, later wins
    temperature = tune.space["method.temperature"]
    assert (temperature.low, temperature.high, temperature.log) == (0.07, 0.2, True)
    assert tune.space["method.concept_weight"].to_dict() == {
        "type": "categorical",
        "choices": [0.5, 1.0],
    }
    assert "method.cluster_layer" not in tune.space


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


def test_the_fingerprint_hash_is_the_hash_of_the_trials_base_config():
    """Validation loads the study's layers; trials pass the same values as overrides."""
    tune = load_tune_config("concl", "demo", overrides=("pretrain.log_every=5",))
    cfg = load_config("concl", "demo", overrides=tune.base_overrides(), announce=False)
    assert config_hash(cfg) == tune.base_hash
