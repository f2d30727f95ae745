from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmark import config as config_mod
from benchmark.config import ConfigError, config_hash, flatten, load_config


def demo(*overrides: str, files: tuple[str, ...] = ()):
    return load_config("mocov2", "demo", files, overrides, announce=False)


def test_layers_apply_in_order():
    cfg = demo()
    # paper/mocov2.yaml sets the paper value; demo/mocov2.yaml shrinks it for the CPU demo
    assert cfg.method.queue_size == 512
    assert cfg.method.temperature == 0.2
    assert cfg.pretrain.batch_size == 32  # demo.yaml overrides the method's 256
    assert (cfg.optim.lr, cfg.optim.scale_lr) == (0.06, False)  # demo/mocov2.yaml, calibrated
    assert cfg.profile == "demo"


def test_paper_profile_keeps_paper_hyperparameters():
    cfg = load_config("mocov2", "paper", announce=False)
    assert (cfg.method.queue_size, cfg.method.momentum, cfg.method.temperature) == (
        16384,
        0.999,
        0.2,
    )
    assert (cfg.method.hidden_dim, cfg.method.feat_dim) == (512, 128)
    assert (cfg.pretrain.batch_size, cfg.pretrain.bn_batch_size, cfg.pretrain.epochs) == (
        256,
        32,
        200,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (0.03, 1e-4, "cosine")
    assert cfg.data.image_size == 224


def test_override_types_are_converted():
    cfg = demo("pretrain.epochs=7", "optim.lr=0.5", "pretrain.amp_bf16=true")
    assert cfg.pretrain.epochs == 7 and isinstance(cfg.pretrain.epochs, int)
    assert cfg.optim.lr == 0.5 and cfg.pretrain.amp_bf16 is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "pretrain.epoch=3",
            "command line: unknown config key 'pretrain.epoch'; did you mean 'pretrain.epochs'?",
        ),
        ("method.temprature=0.1", "did you mean 'method.temperature'?"),
        ("pretrain.epochs=abc", "command line: wrong type for config key 'pretrain.epochs'"),
        ("nonsense", "override 'nonsense' is not of the form key=value"),
        ("pretrain.epochs=0", "pretrain.epochs must be >= 1"),
        ("optim.schedule=linear", "optim.schedule must be cosine or step"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError) as info:
        demo(override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_key_in_file_names_file_and_key(tmp_path: Path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("pretrain:\n  batchsize: 64\n")
    with pytest.raises(
        ConfigError,
        match=r"mine\.yaml: unknown config key 'pretrain\.batchsize'; "
        r"did you mean 'pretrain\.batch_size'",
    ):
        demo(files=(str(bad),))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data:\n  image_size: big\n")
    with pytest.raises(
        ConfigError, match=r"wrong\.yaml: wrong type for config key 'data\.image_size'"
    ):
        demo(files=(str(wrong),))


def test_user_file_layer_wins_over_profile(tmp_path: Path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("pretrain:\n  batch_size: 64\n")
    assert demo(files=(str(mine),)).pretrain.batch_size == 64
    # and the command line wins over files
    assert demo("pretrain.batch_size=16", files=(str(mine),)).pretrain.batch_size == 16


def test_method_name_cannot_be_overridden():
    with pytest.raises(ConfigError, match="choose the method with METHOD="):
        demo("method.name=other")


def test_hash_is_stable_under_key_order_and_ignores_execution_keys():
    cfg = demo()
    shuffled = OmegaConf.create(dict(reversed(list(OmegaConf.to_container(cfg).items()))))
    assert config_hash(shuffled) == config_hash(cfg)
    assert config_hash(demo("data.num_workers=0", "pretrain.log_every=3")) == config_hash(cfg)
    assert config_hash(demo("pretrain.epochs=5")) != config_hash(cfg)
    assert config_hash(demo("method.temperature=0.1")) != config_hash(cfg)
    assert len(config_hash(cfg)) == 12


def test_auto_profile_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    monkeypatch.setattr(config_mod, "REAL_PRETRAIN_ROOT", tmp_path / "NCT")
    cfg = load_config("mocov2", "auto")
    assert cfg.profile == "demo"
    assert "profile: demo (no real pre-training data in" in capsys.readouterr().err
    (tmp_path / "NCT" / "ADI").mkdir(parents=True)
    (tmp_path / "NCT" / "ADI" / "ADI-1.tif").write_bytes(b"")
    cfg = load_config("mocov2", "auto")
    assert cfg.profile == "paper"
    assert "profile: paper (real pre-training data found in" in capsys.readouterr().err


def test_unknown_profile():
    with pytest.raises(
        ConfigError, match="unknown profile 'fast'; use one of: auto, paper, cpu, demo"
    ):
        load_config("mocov2", "fast", announce=False)


def test_cpu_study_profile_is_the_demo_with_more_seeds_and_reuses_its_pre_training():
    from benchmark.config import finetune_hash, pretrain_hash, probe_hash, to_container

    study = load_config("mocov2", "cpu", announce=False)
    demo_cfg = load_config("mocov2", "demo", announce=False)
    assert study.profile == "cpu"
    assert study.method.queue_size == demo_cfg.method.queue_size  # demo/mocov2.yaml applies
    assert (study.finetune.seeds, study.probe.seeds) == (3, 3)
    assert pretrain_hash(study) == pretrain_hash(demo_cfg)
    assert finetune_hash(study) != finetune_hash(demo_cfg)  # the number of seeds is hashed
    assert probe_hash(study) == probe_hash(demo_cfg)  # per-seed results: more seeds add
    assert probe_hash(demo("probe.seeds=5")) == probe_hash(demo_cfg)
    assert probe_hash(demo("probe.tissue.knn_k=5")) != probe_hash(demo_cfg)
    assert probe_hash(demo("probe.num_workers=0")) == probe_hash(demo_cfg)
    a, b = to_container(study), to_container(demo_cfg)
    for tree in (a, b):
        del tree["profile"], tree["finetune"]["seeds"], tree["probe"]["seeds"]
    assert a == b


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


@pytest.mark.parametrize(
    ("batch", "bn", "world", "message"),
    [
        (32, 16, 3, "pretrain.batch_size=32 does not split over 3 processes"),
        (48, 32, 1, "the per-process batch 48 is not a multiple of pretrain.bn_batch_size=32"),
    ],
)
def test_layout_errors(batch: int, bn: int, world: int, message: str):
    cfg = demo(f"pretrain.batch_size={batch}", f"pretrain.bn_batch_size={bn}")
    with pytest.raises(ConfigError, match=message):
        config_mod.check_layout(cfg, world)


def test_layout_accepts_groups_larger_than_a_process_share():
    # 8 processes x 16 images: BN groups shrink to the 16 images a process holds
    config_mod.check_layout(demo("pretrain.batch_size=128", "pretrain.bn_batch_size=32"), 8)
    config_mod.check_layout(demo("pretrain.batch_size=256", "pretrain.bn_batch_size=32"), 1)


def test_a_method_revision_enters_the_hash_and_only_where_set():
    from benchmark.config import digest, pretrain_hash, to_container

    def plain(cfg, sections):  # the hash as it was before revisions existed
        tree = to_container(cfg)
        for key in config_mod.UNHASHED_KEYS:
            config_mod._drop(tree, key)
        return digest({k: v for k, v in tree.items() if k in sections})

    default = load_config("concl", "paper", announce=False)
    assert pretrain_hash(default) == plain(default, config_mod.PRETRAIN_SECTIONS)
    stem = load_config("concl", "paper", overrides=("method.cluster_layer=stem",), announce=False)
    assert pretrain_hash(stem) != plain(stem, config_mod.PRETRAIN_SECTIONS)
    tree = {k: v for k, v in to_container(stem).items() if k in config_mod.PRETRAIN_SECTIONS}
    for key in config_mod.UNHASHED_KEYS:
        config_mod._drop(tree, key)
    assert pretrain_hash(stem) == digest({**tree, "method_revision": 1})
