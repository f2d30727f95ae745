"""The labelled sets and the per-seed training draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.pretrain import DatasetError
from benchmark.probe.tissue import LabelledPatches, class_names, draw_training


def _folder(root: Path, layout: dict[str, int]) -> Path:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_classes_are_the_union_of_both_sets_and_labels_follow_folders(tmp_path: Path):
    train = _folder(tmp_path / "train", {"ADI": 2, "TUM": 3})
    test = _folder(tmp_path / "test", {"LYM": 1, "TUM": 1})
    classes = class_names(train, test)
    assert classes == ["ADI", "LYM", "TUM"]
    data = LabelledPatches(train, 32, classes)
    assert data.labels.tolist() == [0, 0, 2, 2, 2]
    image, label = data[2]
    assert image.shape == (3, 32, 32) and int(label) == 2


def test_images_outside_class_folders_are_refused_in_one_line(tmp_path: Path):
    root = _folder(tmp_path / "set", {"ADI": 1})
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.raises(DatasetError, match="outside class folders") as info:
        LabelledPatches(root, 32)
    assert "\n" not in str(info.value)


def test_training_draw_caps_each_class_and_depends_on_the_seed():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    pick = draw_training(labels, 4, seed=1)
    assert np.bincount(labels[pick]).tolist() == [4, 3, 4]
    assert np.array_equal(pick, np.sort(pick)) and len(set(pick)) == len(pick)
    assert np.array_equal(pick, draw_training(labels, 4, seed=1))
    assert not np.array_equal(pick, draw_training(labels, 4, seed=2))
    assert np.array_equal(draw_training(labels, None, seed=1), np.arange(len(labels)))


def test_features_hold_only_the_drawn_images_and_each_seed_finds_its_own():
    import torch

    from benchmark.probe.tissue import TissueFeatures

    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    index = np.unique(np.concatenate([draw_training(labels, 4, s) for s in (1, 2)]))
    assert len(index) < len(labels)  # the union of two draws, not the whole set
    feats = TissueFeatures(
        train=torch.tensor(index, dtype=torch.float32)[:, None],  # a feature = its image index
        train_labels=torch.from_numpy(labels[index]),
        test=torch.zeros(1, 1),
        test_labels=torch.zeros(1, dtype=torch.long),
        classes=["a", "b", "c"],
        train_index=index,
        all_train_labels=labels,
    )
    for seed in (1, 2):
        x, y, n = feats.draw(4, seed)
        pick = draw_training(labels, 4, seed)
        assert n == len(pick) == 11
        assert x[:, 0].long().tolist() == pick.tolist()
        assert y.tolist() == labels[pick].tolist()
