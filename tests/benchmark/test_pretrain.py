"""End-to-end pre-training on a tiny image folder: tracking, export, resume, DDP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.core.errors import UserError
from benchmark.pretrain import TrainingDiverged, run_pretrain
from benchmark.training.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parents[2]
#: Methods with a momentum encoder and a key queue (``method.queue_size``).
QUEUE_METHODS = ("mocov1", "mocov2", "densecl", "concl", "pcl")


@pytest.fixture
def tiny(tiny_overrides):
    def make(out: Path, *extra: str):
        return load_config("mocov2", "demo", overrides=tiny_overrides(out, *extra), announce=False)

    return make


def runs(tag_filter: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    return client.search_runs([exp.experiment_id], filter_string=tag_filter) if exp else []


def test_pretrain_tracks_one_parent_and_child_and_exports_backbone(tiny, tmp_path: Path):
    # the paper's linear LR scaling (the demo's MoCo-v2 file turns it off for 0.06 at 32)
    scaled = ("optim.lr=0.03", "optim.scale_lr=true")
    cfg = tiny(tmp_path, *scaled)
    result = run_pretrain(cfg, World())
    assert result.epochs_done == 2 and not result.already_finished

    parents = runs("tags.run_kind = 'benchmark'")
    children = runs("tags.stage = 'pretrain'")
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    for tag in ("method", "epochs", "profile", "config_hash", "mlflow.source.git.commit"):
        assert tag in parent.data.tags
    assert parent.data.tags["method"] == "mocov2" and parent.data.tags["epochs"] == "2"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.status == "FINISHED"
    assert child.data.params["method.queue_size"] == "64"
    assert child.data.params["lr_scaled"] == str(0.03 * 8 / 256)
    history = MlflowClient().get_metric_history(child.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert all(np.isfinite(m.value) for m in history)
    lrs = MlflowClient().get_metric_history(child.info.run_id, "lr")
    # cosine per epoch from the scaled LR: epoch 1 at the full LR, epoch 2 at half of it
    assert [m.value for m in lrs] == pytest.approx([0.03 * 8 / 256, 0.03 * 8 / 256 * 0.5])
    assert "images_per_sec" in child.data.metrics
    artifacts = {a.path for a in MlflowClient().list_artifacts(child.info.run_id)}
    assert {"config.yaml", "backbone.pth"} <= artifacts
    # the Dataset column: the pre-training folder, on the child and on its parent
    for run in (child, parent):
        inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [
            (Path(cfg.data.root).name, "pretrain")
        ]
    # the Models column and the registry: the backbone under its method and budget
    assert child.data.tags["registered_model"] == "mocov2-r18-ep2-demo/1"
    assert parent.data.tags["registered_model"] == "mocov2-r18-ep2-demo/1"

    state = torch.load(result.backbone_path, weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(state["conv1.weight"], result.method.backbone().conv1.weight.detach())

    # the same command again: nothing re-runs, nothing is duplicated
    again = run_pretrain(tiny(tmp_path, *scaled), World())
    assert again.already_finished
    assert len(runs("tags.run_kind = 'benchmark'")) == 1
    assert len(runs("tags.stage = 'pretrain'")) == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path: Path):
    straight = run_pretrain(tiny(tmp_path / "straight", "tracking.experiment=a"), World())

    cfg = tiny(tmp_path / "resumed", "tracking.experiment=b")
    first = run_pretrain(cfg, World(), stop_after_epoch=1)
    assert first.epochs_done == 1 and not first.backbone_path.exists()
    assert (first.run_dir / "epoch_0000001.pth").is_file()
    resumed = run_pretrain(cfg, World())
    assert resumed.epochs_done == 2

    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    client = MlflowClient()
    exp = client.get_experiment_by_name("b")
    children = client.search_runs([exp.experiment_id], "tags.stage = 'pretrain'")
    assert len(children) == 1
    history = client.get_metric_history(children[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert children[0].info.status == "FINISHED"


@pytest.mark.parametrize(
    "method", ["mocov1", "mocov2", "densecl", "concl", "simclr", "byol", "pcl"]
)
def test_two_process_gloo_pretraining_keeps_ranks_in_sync(
    method: str, tiny_overrides, tmp_path: Path
):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = tiny_overrides(tmp_path / "out")
    if method not in QUEUE_METHODS:
        overrides = tuple(o for o in overrides if not o.startswith("method.queue_size"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(REPO / "tests" / "benchmark" / "_ddp_worker.py"),
        str(tmp_path),
        method,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pth", weights_only=True)
    params = [k for k in rank0 if "running_" not in k and "num_batches" not in k]
    if method in QUEUE_METHODS:  # the momentum encoder and queues are replicated too
        assert any(k.startswith("encoder_k") for k in params)
        assert any(k.startswith("queue") for k in params)
    for key in params:
        assert torch.equal(rank0[key], rank1[key]), key
    assert len(runs("tags.stage = 'pretrain'")) == 1
    assert len(runs("tags.run_kind = 'benchmark'")) == 1
    child = runs("tags.stage = 'pretrain'")[0]
    assert child.data.params["world_size"] == "2"
    assert len(MlflowClient().get_metric_history(child.info.run_id, "loss")) == 2
    # one warm-up epoch in the demo configs, then concepts / prototypes train
    warm_term = {"concl": "concept_loss", "pcl": "proto_loss"}.get(method)
    if warm_term:
        history = MlflowClient().get_metric_history(child.info.run_id, warm_term)
        assert [m.value > 0 for m in sorted(history, key=lambda m: m.step)] == [False, True]


def test_unreadable_checkpoint_is_a_clear_error_and_is_kept(tiny, tmp_path: Path):
    cfg = tiny(tmp_path, "pretrain.epochs=3")
    first = run_pretrain(cfg, World(), stop_after_epoch=1)
    broken = first.run_dir / "epoch_0000002.pth"
    broken.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"epoch_0000002\.pth cannot be read .*move it aside"):
        run_pretrain(cfg, World())
    assert broken.read_bytes() == b"truncated"
    assert (first.run_dir / "epoch_0000001.pth").is_file()


def test_nan_loss_stops_with_a_clear_message(tiny, tmp_path: Path):
    cfg = tiny(tmp_path, "optim.lr=1e30", "pretrain.log_every=1")
    with pytest.raises(TrainingDiverged, match="training diverged; lower optim.lr"):
        run_pretrain(cfg, World())
    child = runs("tags.stage = 'pretrain'")[0]
    assert child.info.status == "FAILED"


def _pretraining_methods() -> list[str]:
    from benchmark.core.registry import get_method, registered_methods

    return [m for m in registered_methods() if get_method(m).pretrains]


@pytest.mark.parametrize("method", _pretraining_methods())
def test_every_method_runs_its_demo_config_and_trains_every_loss_term(
    method: str, tiny_overrides, tmp_path: Path
):
    """Two epochs of each method's demo config on the tiny folder: the demo warm-ups are
    one epoch, so the second runs what is distinctive (concepts, prototypes)."""
    overrides = [o for o in tiny_overrides(tmp_path / "out") if not o.startswith("method.")]
    cfg = load_config(method, "demo", overrides=tuple(overrides), announce=False)
    result = run_pretrain(cfg, World())
    assert result.epochs_done == 2
    child = runs("tags.stage = 'pretrain'")[0]
    terms = [k for k in child.data.metrics if k == "loss" or k.endswith("_loss")]
    assert "loss" in terms
    for term in terms:
        history = sorted(
            MlflowClient().get_metric_history(child.info.run_id, term), key=lambda m: m.step
        )
        assert len(history) == 2 and all(np.isfinite(m.value) for m in history), term
        assert history[-1].value != 0, f"{method}: {term} is 0 in the last epoch"


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_backbone_of_a_finished_run_is_exported_again_or_named(
    tiny, tmp_path: Path, capsys
):
    cfg = tiny(tmp_path)
    result = run_pretrain(cfg, World())
    done, backbone = result.run_dir / "done.json", result.backbone_path
    record = json.loads(done.read_text())
    assert record["backbone_bytes"] == backbone.stat().st_size
    assert record["backbone_sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    exported = torch.load(backbone, weights_only=True)
    capsys.readouterr()

    # truncated after the run finished: exported again from the last epoch's checkpoint
    backbone.write_bytes(backbone.read_bytes()[:1000])
    again = run_pretrain(cfg, World())
    assert not again.already_finished and again.epochs_done == 2
    err = capsys.readouterr().err
    assert f"backbone {backbone} is damaged (1000 bytes, {record['backbone_bytes']} when" in err
    assert "exporting it again from" in err and "epoch_0000002.pth" in err
    assert _same_tensors(torch.load(backbone, weights_only=True), exported)
    assert run_pretrain(cfg, World()).already_finished
    assert runs("tags.stage = 'pretrain'")[0].info.status == "FINISHED"

    # the same bytes flipped (size unchanged): the sha256 tells
    data = bytearray(backbone.read_bytes())
    data[-100] ^= 0xFF
    backbone.write_bytes(bytes(data))
    assert not run_pretrain(cfg, World()).already_finished
    assert "its sha256 is not the one in" in capsys.readouterr().err

    # a done.json from before it recorded the backbone: accepted while the backbone loads
    done.write_text(json.dumps({"pretrain_hash": record["pretrain_hash"], "epochs": 2}))
    assert run_pretrain(cfg, World()).already_finished
    backbone.write_bytes(b"")
    assert not run_pretrain(cfg, World()).already_finished
    done.write_text("{trunc")
    assert not run_pretrain(cfg, World()).already_finished
    assert "done.json cannot be read (JSONDecodeError); exporting it again" in (
        capsys.readouterr().err
    )

    # without the last epoch's checkpoint: one line naming the file and what to do
    backbone.write_bytes(b"x")
    (result.run_dir / "epoch_0000002.pth").unlink()
    with pytest.raises(CheckpointError) as exc:
        run_pretrain(cfg, World())
    size = json.loads(done.read_text())["backbone_bytes"]
    assert str(exc.value) == (
        f"backbone {backbone} is damaged (1 bytes, {size} when written) and the checkpoint of "
        f"epoch 2 is gone: delete {done} and {backbone} to resume from epoch_0000001.pth "
        f"(epoch 1 of 2), or delete the run folder {result.run_dir} to re-train"
    )
    assert backbone.read_bytes() == b"x"


def test_an_unwritable_output_root_is_one_line_and_marks_no_run(tiny, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tiny(blocker / "runs")
    with pytest.raises(UserError) as exc:
        run_pretrain(cfg, World())
    message = str(exc.value)
    assert "\n" not in message and f"cannot write into {blocker / 'runs'}" in message
    assert message.endswith(f"choose a writable output_root=… (it is {blocker / 'runs'})")
    assert runs("tags.run_kind = 'benchmark'") == [] and runs("tags.stage = 'pretrain'") == []


def test_a_batch_larger_than_the_images_is_one_line(tiny, tmp_path: Path):
    cfg = tiny(tmp_path, "pretrain.batch_size=64")
    with pytest.raises(UserError) as exc:
        run_pretrain(cfg, World())
    assert str(exc.value) == (
        f"pretrain.batch_size=64 is larger than the 32 pre-training images in {cfg.data.root}: "
        "lower pretrain.batch_size to at most 32 or add images"
    )
    assert runs("tags.stage = 'pretrain'") == []  # before the child is opened
