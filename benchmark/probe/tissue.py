"""Labelled patch sets for the tissue probes, and the per-seed training draw.

A set is a folder tree ``<root>/<CLASS>/<image>`` (NCT-CRC-HE-100K, CRC-VAL-HE-7K and the
synthetic sets share it); the class is the first path component. Class indices come from
the sorted union of both sets' class names, so train and test agree even when a class is
missing from one of them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from benchmark.data.pretrain import DatasetError, PretrainImageDataset
from benchmark.data.seeding import mix_seed
from benchmark.probe.features import pooled_features
from methods.augment import center_view

#: ``mix_seed`` stream of the per-seed training draw.
DRAW_STREAM = 11


class LabelledPatches(Dataset):
    """``(view, class index)`` for every image of a class-folder tree."""

    def __init__(self, root: str | Path, image_size: int, classes: list[str] | None = None):
        self.images = PretrainImageDataset(root, None, transform=center_view(image_size))
        names = [p.split("/", 1)[0] if "/" in p else "" for p in self.images.paths]
        if "" in names:
            raise DatasetError(
                f"{root} has images outside class folders: the tissue probe needs "
                "<root>/<CLASS>/<image> (the NCT-CRC-HE-100K layout)"
            )
        self.names = names
        self.classes = classes if classes is not None else sorted(set(names))
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([index[n] for n in names], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def class_names(*roots: str | Path) -> list[str]:
    """Sorted class folder names (folders holding at least one image) of all ``roots``."""
    found: set[str] = set()
    for root in roots:
        found.update(p.split("/", 1)[0] for p in PretrainImageDataset(root).paths if "/" in p)
    return sorted(found)


def ensure_synthetic(cfg: DictConfig) -> None:
    """Generate the two synthetic labelled sets on first use (demo profile)."""
    from benchmark.data.synthetic import is_complete, write_pretrain_set

    t = cfg.probe.tissue
    for root, n, seed in (
        (t.train_root, t.synthetic_train, t.synthetic_seed_train),
        (t.test_root, t.synthetic_test, t.synthetic_seed_test),
    ):
        if not is_complete(Path(root), n, t.synthetic_size, seed):
            print(
                f"==> probe: generating {n} labelled synthetic patches in {root}", file=sys.stderr
            )
        write_pretrain_set(Path(root), n, t.synthetic_size, seed, list_file="images.txt")


def check_roots(cfg: DictConfig) -> None:
    """One line that says where the tissue probe's data go when they are not there."""
    t = cfg.probe.tissue
    for what, root in (("training", t.train_root), ("test", t.test_root)):
        if not Path(root).is_dir():
            raise DatasetError(
                f"tissue probe {what} set {root} does not exist: put CRC-VAL-HE-7K and "
                "NCT-CRC-HE-100K under datasets/ (see datasets/README.md), or leave the tissue "
                "probes out with probe.probes=[dense]"
            )


def draw_training(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` samples of each class, drawn for ``seed``
    without replacement; all indices when ``per_class`` is None."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(mix_seed(DRAW_STREAM, seed))
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(picks))


@dataclass
class TissueFeatures:
    """Pooled features of one trunk: the training images some seed draws (``train_index``
    into the training set, sorted) and every test image."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    train_index: np.ndarray
    #: Labels of the whole training set, from which each seed draws.
    all_train_labels: np.ndarray

    def draw(self, per_class: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The features and labels ``seed`` draws, and how many."""
        pick = draw_training(self.all_train_labels, per_class, seed)
        rows = torch.from_numpy(np.searchsorted(self.train_index, pick))
        return self.train[rows], self.train_labels[rows], len(pick)


def tissue_features(
    cfg: DictConfig, trunk, device: torch.device, seeds: Sequence[int]
) -> TissueFeatures:
    """Features of the training images that ``seeds`` draw (not all 100 000 of NCT) and of
    the test set."""
    t, p = cfg.probe.tissue, cfg.probe
    classes = class_names(t.train_root, t.test_root)
    train = LabelledPatches(t.train_root, cfg.data.image_size, classes)
    labels = train.labels.numpy()
    index = np.unique(np.concatenate([draw_training(labels, t.train_per_class, s) for s in seeds]))
    test = LabelledPatches(t.test_root, cfg.data.image_size, classes)
    out = []
    for data in (Subset(train, index.tolist()), test):
        loader = DataLoader(
            data,
            batch_size=p.batch_size,
            num_workers=p.num_workers,
            pin_memory=device.type == "cuda",
        )
        out.extend(pooled_features(trunk, loader, device))
    return TissueFeatures(*out, classes=classes, train_index=index, all_train_labels=labels)
