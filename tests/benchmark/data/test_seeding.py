from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.functional import to_tensor

from benchmark.data.pretrain import DatasetError, PretrainImageDataset
from benchmark.data.seeding import (
    DATA_STREAM,
    FINETUNE_DATA_STREAM,
    MODEL_STREAM,
    EpochTaggedSampler,
    OffStreamIteration,
    SeededSamples,
    epoch_batches,
    mix_seed,
)


class RandomDraw(Dataset):
    """Each item is a draw from torch's global RNG, like a random augmentation."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def draws(workers: int, epoch: int) -> dict[int, torch.Tensor]:
    sampler = EpochTaggedSampler(DistributedSampler(RandomDraw(), 1, 0, shuffle=True, seed=0))
    sampler.set_epoch(epoch)
    order = [i for _, i in sampler]
    loader = DataLoader(
        SeededSamples(RandomDraw(), seed=7), batch_size=4, sampler=sampler, num_workers=workers
    )
    values = torch.cat(list(loader))
    return dict(zip(order, values, strict=True))


def test_views_depend_on_seed_epoch_index_not_on_workers():
    in_process, two_workers = draws(0, epoch=3), draws(2, epoch=3)
    assert in_process.keys() == two_workers.keys()
    for index, value in in_process.items():
        assert torch.equal(value, two_workers[index])
        torch.manual_seed(mix_seed(DATA_STREAM, 7, 3, index))
        assert torch.equal(value, torch.rand(3))  # the seed recipe, by hand
    other_epoch = draws(0, epoch=4)
    assert not torch.equal(in_process[0], other_epoch[0])


def test_loading_restores_the_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(2)
    torch.manual_seed(123)
    SeededSamples(RandomDraw(), seed=0)[(0, 5)]
    assert torch.equal(torch.rand(2), expected)


def test_sampler_tags_the_epoch_and_follows_distributed_order():
    base = DistributedSampler(RandomDraw(), 2, 1, shuffle=True, seed=0, drop_last=True)
    tagged = EpochTaggedSampler(
        DistributedSampler(RandomDraw(), 2, 1, shuffle=True, seed=0, drop_last=True)
    )
    base.set_epoch(5)
    tagged.set_epoch(5)
    assert list(tagged) == [(5, i) for i in base]
    assert len(tagged) == len(base) == 6


def test_sampler_starts_at_an_offset_for_one_epoch_only():
    def tagged() -> EpochTaggedSampler:
        return EpochTaggedSampler(DistributedSampler(RandomDraw(), 1, 0, shuffle=True, seed=3))

    full, offset = tagged(), tagged()
    full.set_epoch(2)
    offset.set_epoch(2, skip=5)
    assert list(offset) == list(full)[5:] and len(offset) == 7
    offset.set_epoch(3)
    full.set_epoch(3)
    assert list(offset) == list(full) and len(offset) == 12
    with pytest.raises(ValueError, match="skip"):
        offset.set_epoch(0, skip=13)


def test_stream_keys_the_seed_of_a_sample():
    ds = SeededSamples(RandomDraw(), seed=7, stream=FINETUNE_DATA_STREAM)
    torch.manual_seed(mix_seed(FINETUNE_DATA_STREAM, 7, 1, 4))
    assert torch.equal(ds[(1, 4)], torch.rand(3))
    assert not torch.equal(ds[(1, 4)], SeededSamples(RandomDraw(), seed=7)[(1, 4)])


def _after_epoch(loader: DataLoader, epoch: int) -> torch.Tensor:
    """Two global draws after iterating ``epoch`` of ``loader`` from seed 5."""
    torch.manual_seed(5)
    assert len(list(epoch_batches(loader, epoch))) == 2
    return torch.rand(2)


@pytest.mark.parametrize("workers", [0, 1])
def test_only_epoch_0_draws_the_loaders_seed_from_the_global_rng(workers: int):
    torch.manual_seed(5)
    untouched = torch.rand(2)
    persistent = workers > 0
    # items that draw nothing (the real ones draw under SeededSamples' fork_rng)
    loader = DataLoader(
        list(range(12)), batch_size=6, num_workers=workers, persistent_workers=persistent
    )
    assert epoch_batches(loader, 0) is loader
    # epoch 0: the one draw of the workers' base seed, where every run always made it
    assert not torch.equal(_after_epoch(loader, 0), untouched)
    # later epochs: nothing, whether the workers persist or a new iterator is made
    assert isinstance(epoch_batches(loader, 1), OffStreamIteration)
    assert torch.equal(_after_epoch(loader, 1), untouched)
    # a resumed run's first epoch (> 0): a fresh loader, its first iterator off the stream
    fresh = DataLoader(
        list(range(12)), batch_size=6, num_workers=workers, persistent_workers=persistent
    )
    assert torch.equal(_after_epoch(fresh, 3), untouched)


def test_mix_seed_streams_differ():
    assert mix_seed(DATA_STREAM, 0, 1, 2) != mix_seed(MODEL_STREAM, 0, 1, 2)
    assert mix_seed(DATA_STREAM, 0, 1, 2) == mix_seed(DATA_STREAM, 0, 1, 2)
    assert 0 <= mix_seed(DATA_STREAM, 0, 1, 2) < 2**63


def _class_folders(root: Path) -> PretrainImageDataset:
    for i, cls in enumerate(("TUM", "ADI", "TUM", "LYM", "ADI")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / cls / f"{cls}-{i}.png")
    return PretrainImageDataset(root, transform=lambda img: [to_tensor(img), to_tensor(img)])


def test_label_of_each_sample_is_its_class_folder_after_the_views_and_index(
    tmp_path: Path,
) -> None:
    ds = _class_folders(tmp_path)
    assert ds.classes == ["ADI", "LYM", "TUM"]
    plain = SeededSamples(ds, seed=0)
    labelled = SeededSamples(ds, seed=0, with_label=True)
    both = SeededSamples(ds, seed=0, with_index=True, with_label=True)
    for index, path in enumerate(ds.paths):
        views = plain[(1, index)]
        *same_views, label = labelled[(1, index)]
        *views_too, idx, label_too = both[(1, index)]
        assert all(torch.equal(a, b) for a, b in zip(views, same_views, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(views, views_too, strict=True))
        assert label.dtype == torch.long and label.dim() == 0
        assert ds.classes[int(label)] == path.split("/")[0] == ds.classes[int(label_too)]
        assert int(idx) == index
    batch = next(iter(DataLoader(labelled, batch_size=5, sampler=[(0, i) for i in range(5)])))
    assert batch[-1].tolist() == [ds.label(i) for i in range(5)] == [0, 0, 1, 2, 2]


def test_labels_without_class_folders_are_refused_before_loading(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(DatasetError, match="supervised method needs class folders"):
        SeededSamples(PretrainImageDataset(tmp_path), seed=0, with_label=True)
