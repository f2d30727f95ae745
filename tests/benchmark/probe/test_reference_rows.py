"""The reference rows on a toy: a short supervised run's probe beats frozen random init.

The toy is built so that random features are not enough. Each 32 px image has a random colour,
coarse colour blobs of high amplitude and pixel noise (nuisance that dominates the pooled
features of a random trunk), plus the class signal: grey square-wave stripes of period 8 px,
horizontal (class ``H``) or vertical (class ``V``), at a random phase. Stripes survive MoCo-v2's
views (crops from 0.2 only zoom them, jitter and grayscale keep them, a horizontal flip keeps
their orientation, period 8 outlives the blur), so the supervised run can learn them; random
pooled features see them only faintly under the nuisance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.pretrain import run_pretrain
from benchmark.probe.features import build_trunk, pooled_features
from benchmark.probe.knn import knn_predict
from benchmark.probe.linear import classification_scores
from benchmark.probe.tissue import LabelledPatches

SIZE = 32
PERIOD = 8
CLASSES = ["H", "V"]
PER_CLASS = 64  # images per class in each split
TOY_SEED = 0
RANDOM_SEEDS = (0, 1, 2)
MARGIN = 15.0  # balanced-accuracy points over the best random-init trunk
CPU = torch.device("cpu")


def _image(rng: np.random.Generator, horizontal: bool) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    coord = y if horizontal else x
    stripes = ((coord + rng.uniform(0, PERIOD)) // (PERIOD // 2) % 2) * 2 - 1  # +-1
    blobs = np.stack(
        [
            np.asarray(
                Image.fromarray(rng.normal(0, 1, (3, 3)).astype(np.float32)).resize(
                    (SIZE, SIZE), Image.BICUBIC
                )
            )
            for _ in range(3)
        ],
        axis=-1,
    )
    colour = rng.uniform(40, 215, 3)
    noise = rng.normal(0, 10, (SIZE, SIZE, 3))
    pixels = colour + 45 * blobs + 30 * stripes[..., None] + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_toy(root: Path, seed: int, shuffle_train_labels: bool = False) -> Path:
    """``root/train`` and ``root/test``, each ``PER_CLASS`` images per class folder; with
    ``shuffle_train_labels`` the training images land in random class folders."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
        for i in range(2 * PER_CLASS):
            cls = i % 2
            folder = cls
            if shuffle_train_labels and split == "train":
                folder = int(rng.integers(0, 2))
            image = _image(rng, horizontal=cls == 0)
            Image.fromarray(image).save(root / split / CLASSES[folder] / f"{i:04d}.png")
    return root


def knn_balanced_accuracy(trunk: torch.nn.Module, root: Path) -> float:
    """k-NN (k=20, T=0.07) on pooled features of ``root/train``, scored on ``root/test``."""
    out = []
    for split in ("train", "test"):
        data = LabelledPatches(root / split, SIZE, CLASSES)
        out.extend(pooled_features(trunk, DataLoader(data, batch_size=64), CPU))
    train, train_labels, test, test_labels = out
    predictions = knn_predict(train, train_labels, test, len(CLASSES), k=20, temperature=0.07)
    return classification_scores(test_labels.numpy(), predictions.numpy())["balanced_accuracy"]


def supervised_backbone(root: Path, out: Path, seed: int = 0) -> Path:
    """Eight epochs (64 steps of 16) of the supervised method on ``root/train`` at a constant
    lr 0.01, BN over the whole batch, through the engine; the exported ``backbone.pth``."""
    overrides = (
        f"data.root={root / 'train'}",
        "data.list_file=null",
        "data.synthetic=false",
        f"data.image_size={SIZE}",
        "data.num_workers=0",
        "pretrain.batch_size=16",
        "pretrain.bn_batch_size=16",
        "pretrain.epochs=8",
        f"pretrain.seed={seed}",
        "pretrain.device=cpu",
        "pretrain.channels_last=false",
        "optim.lr=0.01",
        "optim.scale_lr=false",
        "optim.schedule=step",
        "optim.milestones=[1000]",
        f"output_root={out}",
    )
    cfg = load_config("supervised", "demo", overrides=overrides, announce=False)
    result = run_pretrain(cfg, World())
    assert result.backbone_path.is_file() and result.epochs_done == 8
    return result.backbone_path


def test_supervised_probe_beats_every_random_init_trunk_on_a_toy(tmp_path: Path) -> None:
    root = write_toy(tmp_path / "toy", TOY_SEED)
    random = [knn_balanced_accuracy(build_trunk(None, s, CPU), root) for s in RANDOM_SEEDS]
    backbone = supervised_backbone(root, tmp_path / "out")
    supervised = knn_balanced_accuracy(build_trunk(backbone, 0, CPU), root)
    assert max(random) < 85, random  # random features are not enough on this toy
    assert supervised >= max(random) + MARGIN, (supervised, random)
