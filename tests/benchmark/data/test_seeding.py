from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from benchmark.data.seeding import (
    DATA_STREAM,
    MODEL_STREAM,
    EpochTaggedSampler,
    SeededSamples,
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


def test_mix_seed_streams_differ():
    assert mix_seed(DATA_STREAM, 0, 1, 2) != mix_seed(MODEL_STREAM, 0, 1, 2)
    assert mix_seed(DATA_STREAM, 0, 1, 2) == mix_seed(DATA_STREAM, 0, 1, 2)
    assert 0 <= mix_seed(DATA_STREAM, 0, 1, 2) < 2**63
