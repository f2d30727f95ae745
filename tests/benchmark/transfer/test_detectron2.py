"""Weight exchange with detectron2: ConCL's key renames, portable pickles, exact round trip."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from benchmark.training.checkpoints import DiskFullError
from benchmark.transfer.detectron2 import (
    export_detectron2,
    from_detectron2,
    import_detectron2,
    to_detectron2,
)
from benchmark.transfer.model import (
    WeightsError,
    build_mask_rcnn,
    check_backbone_file,
    load_backbone,
    read_backbone_state_dict,
)


@pytest.fixture
def resnet_state() -> dict[str, torch.Tensor]:
    """A resnet18 state_dict with non-trivial BN statistics (two training-mode passes)."""
    torch.manual_seed(0)
    net = resnet18(weights=None).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(2, 3, 32, 32))
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def backbone_pth(tmp_path: Path, resnet_state) -> Path:
    path = tmp_path / "backbone.pth"
    torch.save(resnet_state, path)
    return path


def test_renames_follow_concl_converter() -> None:
    names = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "bn1.num_batches_tracked": "stem.conv1.norm.num_batches_tracked",
        "layer1.0.conv1.weight": "res2.0.conv1.weight",
        "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer2.0.downsample.1.running_var": "res3.0.shortcut.norm.running_var",
        "layer4.1.bn1.weight": "res5.1.conv1.norm.weight",
    }
    state = {k: torch.zeros(1) for k in names} | {"fc.weight": torch.zeros(1)}
    assert set(to_detectron2(state)) == set(names.values())
    assert set(from_detectron2(to_detectron2(state))) == set(names)


def test_export_writes_a_detectron2_pickle(
    tmp_path: Path, backbone_pth: Path, resnet_state
) -> None:
    out = tmp_path / "d2" / "backbone.pkl"
    export_detectron2(backbone_pth, out)
    with open(out, "rb") as fh:
        obj = pickle.load(fh, encoding="latin1")  # as detectron2 reads it
    assert obj["__author__"] == "ConCL-Bench" and obj["matching_heuristics"] is True
    model = obj["model"]
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.running_mean",
        "res2.0.conv1.weight",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.weight",
    ):
        assert isinstance(model[key], np.ndarray), key
    assert not any("fc" in k or "layer" in k or "bn" in k for k in model)
    assert len(model) == len(resnet_state) - 2
    assert model["stem.conv1.norm.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(
        model["res5.1.conv2.weight"], resnet_state["layer4.1.conv2.weight"]
    )
    assert list(tmp_path.joinpath("d2").iterdir()) == [out]  # atomic: no temporary left


@pytest.mark.parametrize("command", ["export", "import"])
def test_a_write_into_the_users_folder_is_atomic(
    tmp_path: Path, backbone_pth: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A kill inside the write leaves the user's file as it was and a temporary file, which
    the next write of that target removes (others' temporary files stay); a full disk is one
    ``DiskFullError`` line and leaves no temporary file."""
    pkl = tmp_path / "src.pkl"
    export_detectron2(backbone_pth, pkl)
    out = tmp_path / "user" / ("backbone.pkl" if command == "export" else "backbone.pth")
    out.parent.mkdir()
    out.write_bytes(b"the user's previous file")
    kept = out.parent / ".notes.txt.abcd1234.tmp"  # another target's: not ours to remove
    kept.write_text("x")
    killed = out.parent / f".{out.name}.k1ll3d_x.tmp"  # what a kill -9 inside the write left
    killed.write_bytes(b"half a pickle")

    def write() -> None:
        if command == "export":
            export_detectron2(backbone_pth, out)
        else:
            import_detectron2(pkl, out)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(DiskFullError) as err:
            write()
    assert str(err.value).startswith(f"disk full while writing {out}: free space under ")
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"the user's previous file"
    assert sorted(out.parent.iterdir()) == sorted([out, kept])  # the stale temp went too

    killed.write_bytes(b"half a pickle")
    write()
    assert sorted(out.parent.iterdir()) == sorted([out, kept])
    assert kept.read_text() == "x"
    assert read_backbone_state_dict(out).keys() == read_backbone_state_dict(pkl).keys()


def test_pickle_loads_without_numpy2_module_names(tmp_path: Path, backbone_pth: Path) -> None:
    """NumPy < 1.26.1 (old detectron2 envs) has no ``numpy._core``; the pickle must not need it."""

    class Numpy1Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            assert not module.startswith(("numpy._core", "numpy.core", "torch")), module
            return super().find_class(module, name)

    out = tmp_path / "w.pkl"
    export_detectron2(backbone_pth, out)
    with open(out, "rb") as fh:
        model = Numpy1Unpickler(fh, encoding="latin1").load()["model"]
    assert model["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert model["stem.conv1.norm.num_batches_tracked"].shape == ()
    assert model["stem.conv1.weight"].flags.writeable  # torch.from_numpy without warnings


def test_round_trip_is_exact(tmp_path: Path, backbone_pth: Path, resnet_state) -> None:
    export_detectron2(backbone_pth, tmp_path / "w.pkl")
    import_detectron2(tmp_path / "w.pkl", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    want = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    assert list(back) == list(want)
    for key, value in want.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert back["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(back["bn1.num_batches_tracked"]) == 2
    model = build_mask_rcnn(min_size_train=(64, 64), min_size_test=64)
    load_backbone(model, tmp_path / "back.pth")
    assert torch.equal(
        model.backbone.body.layer3[0].downsample[1].running_var,
        want["layer3.0.downsample.1.running_var"],
    )


def test_import_reads_concl_and_pcl_pickles(tmp_path: Path, resnet_state) -> None:
    d2 = to_detectron2(resnet_state)
    concl = {"model": d2, "__author__": "OpenSelfSup", "matching_heuristics": True}
    pcl = {f"module.encoder_q.{k}": v for k, v in d2.items()}
    pcl |= {"module.encoder_q.stem.fc.0.weight": np.zeros((4, 512), np.float32)}
    pcl |= {"module.encoder_k.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    for name, obj in (("concl.pkl", concl), ("pcl.pkl", {"model": pcl}), ("bare.pkl", d2)):
        with open(tmp_path / name, "wb") as fh:
            pickle.dump(obj, fh)  # NumPy 2 default pickling
        import_detectron2(tmp_path / name, tmp_path / f"{name}.pth")
        back = torch.load(tmp_path / f"{name}.pth", weights_only=True)
        assert torch.equal(back["conv1.weight"], resnet_state["conv1.weight"]), name
        assert "fc.0.weight" not in back


def test_errors_are_one_line(tmp_path: Path, backbone_pth: Path, resnet_state) -> None:
    d2 = to_detectron2(resnet_state)
    (tmp_path / "junk.pkl").write_text("junk\n" * 3)
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"model": {"x": print}}, fh)
    with open(tmp_path / "partial.pkl", "wb") as fh:
        pickle.dump({k: v for k, v in d2.items() if not k.startswith("res5.")}, fh)
    with open(tmp_path / "odd.pkl", "wb") as fh:
        pickle.dump(d2 | {"roi_heads.box_predictor.weight": np.zeros(2)}, fh)
    with open(tmp_path / "objects.pkl", "wb") as fh:  # numpy's own pickling of an object array
        pickle.dump({"model": d2 | {"stem.conv1.weight": np.array([1, "a", None])}}, fh)
    cases = [
        (lambda: export_detectron2(backbone_pth, tmp_path / "w.pth"), "must end in .pkl"),
        (lambda: import_detectron2(tmp_path / "junk.pkl", tmp_path / "o.pth"), "not a readable"),
        (lambda: import_detectron2(tmp_path / "evil.pkl", tmp_path / "o.pth"), "refusing"),
        (lambda: import_detectron2(tmp_path / "partial.pkl", tmp_path / "o.pth"), "stage layer4"),
        (lambda: import_detectron2(tmp_path / "odd.pkl", tmp_path / "o.pth"), "roi_heads.box"),
        (
            lambda: import_detectron2(tmp_path / "objects.pkl", tmp_path / "o.pth"),
            "stem.conv1.weight is an array of object, not numbers: not a detectron2 or "
            "torchvision state dict of numeric arrays; expected a torchvision ResNet state_dict",
        ),
        (
            lambda: read_backbone_state_dict(tmp_path / "objects.pkl"),
            "or a detectron2 .pkl of numeric arrays",
        ),
    ]
    for call, words in cases:
        with pytest.raises(WeightsError) as err:
            call()
        assert "\n" not in str(err.value) and words in str(err.value)
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "o.pth").exists()


def test_a_detectron2_pickle_is_backbone_weights_too(
    tmp_path: Path, backbone_pth: Path, resnet_state
) -> None:
    """``finetune --weights x.pkl`` scores a detectron2 file as it scores its ``.pth``; a bare
    pickle is recognised by content, and both torch.save formats still load as before."""
    pkl = tmp_path / "backbone.pkl"
    export_detectron2(backbone_pth, pkl)
    (tmp_path / "renamed.bin").write_bytes(pkl.read_bytes())
    torch.save(resnet_state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for path in (pkl, tmp_path / "renamed.bin", tmp_path / "legacy.pth", backbone_pth):
        state = read_backbone_state_dict(path)
        assert set(state) == {k for k in resnet_state if not k.startswith("fc.")}, path.name
        assert all(torch.equal(state[k], resnet_state[k]) for k in state), path.name
        check_backbone_file(path)


def test_weights_that_do_not_fit_are_refused_before_any_model(tmp_path: Path, resnet_state) -> None:
    (tmp_path / "folder.pth").mkdir()
    torch.save({k: v for k, v in resnet_state.items() if "layer4" not in k}, tmp_path / "p.pth")
    for name, words in (
        ("missing.pth", "missing.pth does not exist: give the path of a torchvision ResNet"),
        ("folder.pth", "folder.pth is a folder, not a weights file: give the path of"),
        ("p.pth", "missing keys (layer4.0.conv1.weight"),
    ):
        with pytest.raises(WeightsError) as err:
            check_backbone_file(tmp_path / name)
        assert "\n" not in str(err.value) and words in str(err.value), name
