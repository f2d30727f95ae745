"""The probe tier inside a (tiny) benchmark: children, aggregates, never re-run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.core.schema import PROBE_PER_IMAGE_FILE
from benchmark.pipeline import run_benchmark
from benchmark.probe.features import build_trunk
from tests.benchmark._tiny import TINY_FINETUNE, TINY_TISSUE_PROBE

TINY_PROBE = (
    "probe.probes=[knn,linear,dense]",
    "probe.seeds=2",
    *TINY_TISSUE_PROBE,
    "probe.dense.size=64",
    "probe.dense.max_size=96",
    "probe.dense.iterations=5",
    "probe.dense.batch_size=2",
    "data.image_size=32",
)


def tiny(tmp_path: Path, method: str, *extra: str):
    overrides = (
        f"finetune.glas.raw_root={tmp_path / 'raw'}",
        f"finetune.glas.root={tmp_path / 'coco'}",
        f"probe.tissue.train_root={tmp_path / 'probe' / 'train'}",
        f"probe.tissue.test_root={tmp_path / 'probe' / 'test'}",
        f"output_root={tmp_path / 'out'}",
        "finetune.seeds=1",
        "finetune.datasets=[glas]",
        *TINY_FINETUNE,
        *TINY_PROBE,
        *extra,
    )
    return load_config(method, "demo", overrides=overrides, announce=False)


def probe_children() -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    return client.search_runs([exp.experiment_id], "tags.stage = 'probe'")


def test_probes_run_before_the_detector_as_children_and_are_never_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    summary = run_benchmark(tiny(tmp_path, "random"), World())
    err = capsys.readouterr().err
    assert err.index("==> probe Tissue k-NN seed 1") < err.index("==> finetune")
    runs = probe_children()
    keys = sorted((r.data.tags["dataset"], r.data.tags["probe"], r.data.tags["seed"]) for r in runs)
    assert keys == [
        (ds, probe, seed)
        for ds, probe in (("glas", "dense"), ("tissue", "knn"), ("tissue", "linear"))
        for seed in ("1", "2")
    ]
    assert all(r.info.status == "FINISHED" for r in runs)
    client = MlflowClient()
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    knn = [r for r in runs if r.data.tags["probe"] == "knn"]
    values = [r.data.metrics["balanced_accuracy"] for r in knn]
    assert summary["tissue_knn_balanced_accuracy_mean"] == pytest.approx(statistics.fmean(values))
    assert parent.data.metrics["tissue_knn_balanced_accuracy_std"] == pytest.approx(
        statistics.stdev(values)
    )
    assert parent.data.metrics["glas_dense_seeds"] == 2.0
    assert "glas_bbox_AP_mean" in parent.data.metrics  # the detector still ran
    # random init draws its trunk from the seed: the two seeds' features differ
    a, b = (build_trunk(None, s, torch.device("cpu")) for s in (1, 2))
    assert not a.conv1.weight.equal(b.conv1.weight)
    # per-image results: on disk and as the child's artifact
    dense = next(r for r in runs if r.data.tags["probe"] == "dense")
    local = client.download_artifacts(dense.info.run_id, PROBE_PER_IMAGE_FILE, str(tmp_path))
    per_image = json.loads(Path(local).read_text())
    assert len(per_image["dice"]) == 2  # the tiny GlaS test split
    assert statistics.fmean(per_image["dice"]) == pytest.approx(dense.data.metrics["dice"])
    tissue_run = knn[0]
    local = client.download_artifacts(tissue_run.info.run_id, PROBE_PER_IMAGE_FILE, str(tmp_path))
    assert len(json.loads(Path(local).read_text())["labels"]) == 9
    # what each probe trained and was tested on: the Dataset column of its run
    inputs = {
        (i.dataset.name, i.tags[0].value, json.loads(i.dataset.profile)["images"])
        for i in client.get_run(tissue_run.info.run_id).inputs.dataset_inputs
    }
    assert inputs == {("train", "train", 27), ("test", "test", 9)}
    dense_inputs = client.get_run(dense.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in dense_inputs) == ["GlaS test", "GlaS train"]

    files = sorted((tmp_path / "out").rglob("probe-*/**/metrics.json"))
    assert len(files) == 6
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_benchmark(tiny(tmp_path, "random"), World())
    assert {k: v for k, v in again.items() if "_dense_" in k or "tissue" in k} == {
        k: v for k, v in summary.items() if "_dense_" in k or "tissue" in k
    }
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len(probe_children()) == 6


def test_no_probes_when_none_are_asked_for(tmp_path: Path):
    summary = run_benchmark(tiny(tmp_path, "random", "probe.probes=[]"), World())
    assert not [k for k in summary if "tissue" in k or "dense" in k]
    assert probe_children() == []


def test_missing_tissue_data_is_one_line_that_says_where(tmp_path: Path):
    from benchmark.data.pretrain import DatasetError

    cfg = tiny(tmp_path, "random", "probe.tissue.synthetic=false", "probe.probes=[knn]")
    with pytest.raises(DatasetError, match="probe.probes=\\[dense\\]") as info:
        run_benchmark(cfg, World())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"dice": 0.5', "cannot be read: JSONDecodeError"),
        (b"\xff\xfe", "cannot be read: UnicodeDecodeError"),
        (b"[0.5]", "holds a list, not the probe's scores"),
        (b'{"dice": 0.5}', "has no iou"),
        (b'{"dice": "high", "iou": true}', "has no dice, iou"),
    ],
)
def test_a_damaged_metrics_json_is_one_line_saying_to_delete_it(
    tmp_path: Path, content: bytes, reason: str
):
    """Read back with json.loads, a damaged probe result was a traceback."""
    from benchmark.probe.stage import METRICS_FILE, read_metrics
    from benchmark.training.checkpoints import CheckpointError

    assert read_metrics(tmp_path, "glas", "dense") is None  # not scored yet
    (tmp_path / METRICS_FILE).write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_metrics(tmp_path, "glas", "dense")
    assert str(info.value) == (
        f"{tmp_path / METRICS_FILE} is damaged ({reason}): delete it to re-run that probe"
    )
    (tmp_path / METRICS_FILE).write_text('{"dice": 50.0, "iou": 40, "train_images": 2}')
    assert read_metrics(tmp_path, "glas", "dense") == {"dice": 50.0, "iou": 40, "train_images": 2}
