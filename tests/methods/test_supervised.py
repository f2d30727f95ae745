"""The supervised reference row: cross-entropy by hand, split BN, export, labels, a toy run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from benchmark.config import load_config, pretrain_hash
from benchmark.core.contracts import BuildContext, StepContext, World
from benchmark.core.registry import get_method, registered_methods
from benchmark.data.pretrain import DatasetError, PretrainImageDataset
from benchmark.pretrain import Pretrainer, build_loader, build_method, run_pretrain
from methods.augment import center_view
from methods.shuffle_bn import SplitBatchNorm2d
from methods.supervised import Supervised, SupervisedConfig

CTX = StepContext(epoch=0, step=0, epochs=1, steps_per_epoch=1)
BATCH = 8
CLASSES = 5


def _build(bn_batch_size: int = 4, batch: int = BATCH, num_classes: int = CLASSES) -> Supervised:
    torch.manual_seed(0)
    ctx = BuildContext(World(), 32, batch, bn_batch_size, num_classes=num_classes)
    return Supervised(SupervisedConfig(), ctx)


def _overrides(root: Path, out: Path, *extra: str) -> tuple[str, ...]:
    """A CPU run on the folder ``root``: 32 px views, batch 16 in BN groups of 8."""
    return (
        f"data.root={root}",
        "data.list_file=null",
        "data.synthetic=false",
        "data.image_size=32",
        "data.num_workers=0",
        "pretrain.batch_size=16",
        "pretrain.bn_batch_size=8",
        "pretrain.device=cpu",
        "pretrain.channels_last=false",
        f"output_root={out}",
        *extra,
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    return images, torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])


def test_registered_as_a_pretraining_method_that_wants_labels() -> None:
    assert "supervised" in registered_methods()
    assert get_method("supervised") is Supervised and Supervised.name == "supervised"
    assert Supervised.pretrains and Supervised.wants_labels and not Supervised.wants_sample_index
    assert not get_method("mocov2").wants_labels  # the default of every other method


def test_paper_config_is_moco_v2s_schedule_and_the_demo_scales_it() -> None:
    paper = load_config("supervised", "paper", announce=False)
    assert (paper.method.name, paper.method.depth) == ("supervised", 18)
    assert "num_classes" not in paper.method  # a fact of the data, not a config key
    o = paper.optim
    assert (o.name, o.lr, o.reference_batch, o.momentum, o.weight_decay) == (
        "sgd",
        0.03,
        256,
        0.9,
        1e-4,
    )
    assert (o.schedule, o.warmup_epochs) == ("cosine", 0)
    assert (paper.pretrain.batch_size, paper.pretrain.bn_batch_size) == (256, 32)
    demo = load_config("supervised", "demo", announce=False)
    assert (demo.pretrain.batch_size, demo.pretrain.bn_batch_size) == (32, 16)
    assert pretrain_hash(demo) != pretrain_hash(load_config("mocov2", "demo", announce=False))


def test_loss_is_cross_entropy_of_the_logits_computed_by_hand() -> None:
    model = _build()
    images, labels = _batch()
    out = model([images, labels], CTX)
    assert set(out) == {"loss", "accuracy"}
    with torch.no_grad():
        logits = model.logits(images)  # train-mode BN: the same batch statistics again
    assert logits.shape == (BATCH, CLASSES) and logits.dtype == torch.float32
    log_p = logits - logits.logsumexp(dim=1, keepdim=True)
    by_hand = -log_p[torch.arange(BATCH), labels].mean()
    torch.testing.assert_close(out["loss"].detach(), by_hand)
    torch.testing.assert_close(out["loss"].detach(), F.cross_entropy(logits, labels))
    hits = sum(int(logits[i].argmax() == labels[i]) for i in range(BATCH))
    assert out["accuracy"].item() == pytest.approx(100 * hits / BATCH)
    out["loss"].backward()
    assert model.trunk.conv1.weight.grad is not None and model.classifier.weight.grad is not None


def test_batchnorm_normalises_groups_of_bn_batch_size_images() -> None:
    split, plain = _build(bn_batch_size=4), _build(bn_batch_size=4, batch=4)
    assert split.build_ctx.bn_splits == 2 and isinstance(split.trunk.bn1, SplitBatchNorm2d)
    assert type(plain.trunk.bn1) is torch.nn.BatchNorm2d
    images, _ = _batch()
    with torch.no_grad():
        together = split.logits(images)
        # SplitBatchNorm2d puts sample i in group i % 2: each group as a batch of its own.
        for group in (0, 1):
            torch.testing.assert_close(together[group::2], plain.logits(images[group::2]))


def test_one_moco_v2_view_per_image_at_the_run_size() -> None:
    model = _build()
    views = model.views()(Image.new("RGB", (48, 48), (200, 120, 160)))
    assert len(views) == 1 and views[0].shape == (3, 32, 32)


def test_backbone_is_the_trunk_and_loads_into_torchvision_resnet18() -> None:
    model = _build()
    assert model.backbone() is model.trunk
    state = model.backbone().state_dict()
    assert not any(k.startswith(("fc.", "classifier.")) for k in state)
    result = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_the_number_of_classes_is_required_and_reaches_only_label_methods(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        _build(num_classes=None)  # type: ignore[arg-type]
    cfg = load_config(
        "supervised", "demo", announce=False, overrides=_overrides(tmp_path, tmp_path)
    )
    with pytest.raises(ValueError, match="pass num_classes"):
        build_method(cfg, World())
    assert build_method(cfg, World(), 3).classifier.out_features == 3
    moco = load_config("mocov2", "demo", announce=False, overrides=_overrides(tmp_path, tmp_path))
    assert build_method(moco, World(), 3).build_ctx.num_classes is None


def test_run_without_class_folders_is_refused_in_one_line(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(16):
        Image.new("RGB", (40, 40), (i, i, i)).save(flat / f"tile{i}.png")
    cfg = load_config(
        "supervised", "demo", announce=False, overrides=_overrides(flat, tmp_path / "out")
    )
    with pytest.raises(DatasetError, match="supervised method needs class folders") as e:
        run_pretrain(cfg, World())
    assert "\n" not in str(e.value)


@pytest.fixture
def toy_tissue(tmp_path: Path) -> Path:
    """Three class folders of 40 px images that MoCo-v2's augmentation cannot confuse: bright
    background, dark purple, pink horizontal stripes (crops and flips keep them horizontal)."""
    rng = np.random.default_rng(0)
    stripes = (np.arange(40)[:, None, None] // 4 % 2) * np.array([170, 80, 120])
    looks = {"BACK": 190, "LYM": np.array([60, 20, 110]), "STR": stripes}
    for name, look in looks.items():
        (tmp_path / name).mkdir()
        for i in range(16):
            pixels = np.clip(rng.integers(0, 60, (40, 40, 3)) + look, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{name}-{i}.png")
    return tmp_path


def test_trains_on_a_toy_through_the_engine(toy_tissue: Path, tmp_path: Path) -> None:
    """Three epochs (nine steps of 16) through the engine's loader and optimizer: the loss on
    every training image falls and the accuracy rises, measured against the start."""
    extra = ("pretrain.epochs=3", "optim.lr=0.01", "optim.scale_lr=false")
    cfg = load_config(
        "supervised", "demo", announce=False, overrides=_overrides(toy_tissue, tmp_path, *extra)
    )
    dataset = PretrainImageDataset(toy_tissue)
    assert dataset.classes == ["BACK", "LYM", "STR"]
    method = build_method(cfg, World(), len(dataset.classes))
    dataset.transform = method.views()
    plain = PretrainImageDataset(toy_tissue, transform=center_view(32))
    images = torch.stack([plain[i] for i in range(len(plain))])
    labels = torch.tensor([dataset.label(i) for i in range(len(dataset))])

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            out = method([images, labels], CTX)
        return out["loss"].item(), out["accuracy"].item()

    loss_before, accuracy_before = measure()
    loader = build_loader(cfg, World(), dataset, with_label=True)
    trainer = Pretrainer(cfg, World(), method, steps_per_epoch=len(dataset) // 16)
    history = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        history.append(trainer.train_epoch(loader, epoch))
    loss_after, accuracy_after = measure()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert accuracy_after >= accuracy_before + 30 and accuracy_after >= 90
    assert all(np.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 100 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
