"""A whole (tiny) benchmark: MLflow structure, no re-runs, and completing an interrupted run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmark.config import config_hash as cfg_hash
from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.pipeline import run_benchmark
from tests.benchmark._tiny import TINY_FINETUNE

TINY_TRANSFER = ("finetune.seeds=2", "finetune.datasets=[glas]", *TINY_FINETUNE)


def tiny(tmp_path: Path, method: str, *extra: str):
    overrides = (
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}",
        *TINY_TRANSFER,
        *extra,
    )
    return load_config(method, "demo", overrides=overrides, announce=False)


def children(stage: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")


def test_random_init_benchmark_tracks_seeds_and_never_reruns(tmp_path: Path, capsys):
    cfg = tiny(tmp_path, "random")
    summary = run_benchmark(cfg, World())
    assert set(summary) == {
        f"glas_{m}_AP_{s}" for m in ("bbox", "segm") for s in ("mean", "std", "ci_low", "ci_high")
    } | {"glas_seeds"}
    assert "| random | – | " in capsys.readouterr().err
    runs = children("finetune")
    assert sorted((r.data.tags["dataset"], r.data.tags["seed"]) for r in runs) == [
        ("glas", "1"),
        ("glas", "2"),
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("bbox_AP" in r.data.metrics and "segm_AP75" in r.data.metrics for r in runs)
    assert children("pretrain") == []  # random init has no pre-training
    client = MlflowClient()
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    mean = sum(r.data.metrics["bbox_AP"] for r in runs) / 2
    assert parent.data.metrics["glas_bbox_AP_mean"] == mean
    # what the MLflow UI's run list and description show
    assert parent.info.run_name == "random r18 demo"
    assert sorted(r.info.run_name for r in runs) == ["finetune glas seed 1", "finetune glas seed 2"]
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("Random-initialisation baseline")
    assert "GlaS with 2 seeds" in description and cfg_hash(cfg) in description
    # what the compare view lines benchmarks up by
    assert parent.data.params["method.name"] == "random"
    assert parent.data.params["finetune.seeds"] == "2"
    assert parent.data.metrics["glas_seeds"] == 2.0
    # the UI's Dataset column: GlaS train and test on the parent and on every seed
    for run in (parent, *runs):
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert sorted((i.dataset.name, i.tags[0].value) for i in inputs) == [
            ("GlaS test", "test"),
            ("GlaS train", "train"),
        ]

    files = sorted((tmp_path / "out").rglob("metrics.json"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    ended = {r.info.run_id: r.info.end_time for r in [parent, *runs]}
    again = run_benchmark(tiny(tmp_path, "random"), World())
    assert again == summary
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len(children("finetune")) == 2
    # the re-run ran nothing, so it changed no run: no status, no end time, no metric step
    for run_id, end_time in ended.items():
        run = client.get_run(run_id)
        assert (run.info.status, run.info.end_time) == ("FINISHED", end_time)
    for key in summary:
        assert len(client.get_metric_history(parent.info.run_id, key)) == 1


def test_interrupted_fine_tuning_completes_only_the_missing_work(tmp_path: Path):
    cfg = tiny(tmp_path, "random", "finetune.seeds=1")
    assert run_benchmark(cfg, World(), stop_after_iter=2) == {}
    seed_dir = next((tmp_path / "out").rglob("seed1"))
    assert (seed_dir / "iter_0000002.pth").is_file()
    assert not (seed_dir / "metrics.json").exists()
    summary = run_benchmark(cfg, World())
    assert "glas_bbox_AP_mean" in summary
    assert (seed_dir / "iter_0000004.pth").is_file()
    runs = children("finetune")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4]  # iterations 1-2 were not trained again


def test_two_process_gloo_benchmark_logs_each_seed_once(tmp_path: Path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    overrides = [
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}",
        "pretrain.device=cpu",
        *TINY_TRANSFER,
        "finetune.seeds=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "benchmark",
        "benchmark",
        "-m",
        "random",
        "--profile",
        "demo",
        "--gpus",
        "2",
        *overrides,
    ]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| random | – | " in proc.stderr
    runs = children("finetune")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "bbox_AP" in runs[0].data.metrics


def test_finetune_scores_external_weights_under_their_own_parent(tmp_path: Path):
    import torch
    import torchvision

    from benchmark.cli import main

    weights = tmp_path / "their_resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    overrides = [
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}",
        *TINY_TRANSFER,
        "finetune.seeds=1",
    ]
    assert main(["finetune", "--weights", str(weights), "--profile", "demo", *overrides]) == 0
    runs = children("finetune")
    assert len(runs) == 1 and runs[0].data.params["weights"] == str(weights)
    parent = MlflowClient().get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["method"].startswith("weights-")
    assert "glas_bbox_AP_mean" in parent.data.metrics
    assert children("pretrain") == []
    missing = ["finetune", "--weights", str(tmp_path / "nope.pth"), "--profile", "demo"]
    assert main(missing) == 2


def test_finetune_scores_a_registered_backbone_by_its_models_uri(tmp_path: Path):
    import torch
    import torchvision

    from benchmark.cli import main
    from benchmark.tracking import Tracker

    state = torchvision.models.resnet18().state_dict()
    backbone = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, backbone)
    tracker = Tracker("concl-bench", None, str(tmp_path / "artifacts"))
    parent = tracker.parent_run("mocov2", "abc", {})
    child, _ = tracker.child_run(parent, "pretrain", {"method": "mocov2"})
    assert tracker.register_backbone(child, backbone, "mocov2-r18-ep1-demo", {}) == "1"
    overrides = [
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}",
        *TINY_TRANSFER,
        "finetune.seeds=1",
    ]
    uri = "models:/mocov2-r18-ep1-demo/1"
    assert main(["finetune", "--weights", uri, "--profile", "demo", *overrides]) == 0
    fetched = tmp_path / "out" / "registry" / "mocov2-r18-ep1-demo-v1" / "backbone.pth"
    (run,) = children("finetune")
    assert run.info.status == "FINISHED" and run.data.params["weights"] == str(fetched)
    expected, got = torch.load(backbone), torch.load(fetched)
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in expected)


def test_a_seed_callback_stops_the_benchmark_after_any_seed(tmp_path: Path):
    """What an Optuna pruner needs: stop after seed 1, keep its result, mark the parent KILLED."""
    seen: list[tuple[str, int, float]] = []

    def on_seed(dataset: str, seed: int, metrics: dict[str, float]) -> bool:
        seen.append((dataset, seed, metrics["bbox_AP"]))
        return False

    cfg = tiny(tmp_path, "random")
    summary = run_benchmark(cfg, World(), on_seed=on_seed, parent_tags={"tune_study": "s"})
    assert [(d, s) for d, s, _ in seen] == [("glas", 1)]
    assert summary["glas_bbox_AP_mean"] == seen[0][2]
    assert summary["glas_seeds"] == 1.0
    runs = children("finetune")
    assert [r.data.tags["seed"] for r in runs] == ["1"]
    parent = MlflowClient().get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert parent.data.tags["tune_study"] == "s"


def test_a_damaged_metrics_json_is_one_line_and_touches_no_run(tmp_path: Path, capsys):
    """A scored seed's ``metrics.json`` that does not parse (or lacks bbox_AP) is one line
    saying to delete it, exit 2; before, a JSONDecodeError traceback. Its run, the parent
    and the file are left as they were."""
    from benchmark.cli import main

    argv = [
        "benchmark", "-m", "random", "--profile", "demo",
        f"finetune.glas.raw_root={tmp_path / 'raw'}", f"finetune.glas.root={tmp_path / 'coco'}",
        f"output_root={tmp_path / 'out'}", *TINY_TRANSFER, "finetune.seeds=1",
    ]  # fmt: skip
    assert main(argv) == 0
    (run,) = children("finetune")
    parent_id = run.data.tags["mlflow.parentRunId"]
    client = MlflowClient()
    before = [(r.info.status, r.info.end_time) for r in (run, client.get_run(parent_id))]
    (metrics,) = (tmp_path / "out").rglob("metrics.json")
    for damaged, why in (
        ('{"bbox_AP": 1', "cannot be read (JSONDecodeError)"),
        ('{"segm_AP": 1}', "has no bbox_AP"),
    ):
        metrics.write_text(damaged)
        capsys.readouterr()
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        errors = [line for line in lines if not line.startswith("==> ")]
        assert errors == [
            f"error: {metrics} {why}: delete it to score this fine-tune again from its newest "
            "checkpoint"
        ]
        assert metrics.read_text() == damaged
        after = [
            (r.info.status, r.info.end_time)
            for r in map(client.get_run, (run.info.run_id, parent_id))
        ]
        assert after == before
