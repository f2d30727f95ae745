"""The exported backbone as a registered MLflow model: the same tensors back, by name."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import torchvision

from benchmark.registry import (
    RegistryError,
    fetch_backbone,
    is_model_uri,
    register_backbone,
    registered_name,
)
from benchmark.tracking import REGISTERED_MODEL_TAG, Tracker


def test_registered_names_carry_method_and_budget():
    assert registered_name("concl", 400, "paper") == "concl-r18-ep400"
    assert registered_name("mocov2", 3, "demo") == "mocov2-r18-ep3-demo"
    assert is_model_uri("models:/concl-r18-ep400/1") and not is_model_uri("backbone.pth")


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    return path


def test_register_load_and_fetch_give_backbone_pth(
    tmp_path: Path, backbone: Path, monkeypatch: pytest.MonkeyPatch
):
    tracker = Tracker("concl-bench", None, str(tmp_path / "artifacts"))
    uri = tracker.uri  # the test's own store (MLFLOW_TRACKING_URI)
    parent = tracker.parent_run("mocov2", "abc", {})
    child, _ = tracker.child_run(parent, "pretrain", {"method": "mocov2"})
    name = registered_name("mocov2", 3, "demo")
    version = tracker.register_backbone(child, backbone, name, {"method": "mocov2"})
    assert version == "1"
    assert tracker.client.get_run(child).data.tags[REGISTERED_MODEL_TAG] == f"{name}/1"
    # the run's Models column: a logged model whose source is the pre-training run
    logged = tracker.client.search_logged_models([tracker.experiment_id])
    assert [m.source_run_id for m in logged] == [child]
    # a re-export of the same run registers nothing new
    assert tracker.register_backbone(child, backbone, name, {}) == "1"
    assert len(tracker.client.search_model_versions(f"name = '{name}'")) == 1

    expected = torch.load(backbone, weights_only=True)
    model = mlflow.pytorch.load_model(f"models:/{name}/1")  # MLFLOW_TRACKING_URI is ``uri``
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 512)

    path = fetch_backbone(uri, f"models:/{name}/1", tmp_path / "out")
    assert path == tmp_path / "out" / "registry" / f"{name}-v1" / "backbone.pth"
    fetched = torch.load(path, weights_only=True)
    assert all(torch.equal(fetched[k], expected[k]) for k in expected)
    assert register_backbone(uri, child, backbone, name, {}) == "1"
    # nothing pinned: the process still follows MLFLOW_TRACKING_URI, as the stages expect
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'other.db'}"


def test_unknown_model_uri_is_one_line(tmp_path: Path):
    uri = Tracker("concl-bench", None, str(tmp_path / "artifacts")).uri
    with pytest.raises(RegistryError, match="not a registered model version"):
        fetch_backbone(uri, "models:/nope-r18-ep1/1", tmp_path)
    with pytest.raises(RegistryError, match="names no version"):
        fetch_backbone(uri, "models:/nope-r18-ep1", tmp_path)
