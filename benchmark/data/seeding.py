"""Per-sample augmentation seeds: views depend on (seed, epoch, index), not on the worker.

The sampler tags each index with the epoch; the dataset wrapper seeds torch's RNG from
(seed, epoch, index) around that one sample. The views are then the same whichever worker
draws the sample and however many workers there are, so a resumed run continues exactly
and the DataLoader's workers can stay alive across epochs (re-spawning 16 workers costs
seconds every epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

#: First value of every ``mix_seed`` tuple, so data and model streams never share a seed.
DATA_STREAM, MODEL_STREAM = 1, 2


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (NumPy's ``SeedSequence`` hash).

    Pass tuples of one fixed length per use: ``SeedSequence`` ignores trailing zeros.
    """
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """A ``DistributedSampler`` whose indices carry the epoch they were drawn for."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """Loads ``dataset[index]`` with torch's RNG seeded from (seed, epoch, index).

    The caller's RNG state is restored afterwards, so loading in the main process
    (``num_workers=0``) does not disturb the model's random draws. Extras follow the sample's
    list of views, in this order: with ``with_index`` its index (methods that track samples,
    e.g. PCL), then with ``with_label`` its class, ``dataset.label(index)`` (the supervised
    reference row); each as a 0-d long tensor, so a batch carries (B,) long tensors.
    """

    def __init__(
        self, dataset: Dataset, seed: int, with_index: bool = False, with_label: bool = False
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.with_index = with_index
        self.with_label = with_label
        if with_label:
            # Fail before the first batch, not in a worker: e.g. images without class folders.
            _ = dataset.classes  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(DATA_STREAM, self.seed, epoch, index))
            item = self.dataset[index]
        if not (self.with_index or self.with_label):
            return item
        extras = [torch.tensor(index)] if self.with_index else []
        if self.with_label:
            extras.append(torch.tensor(self.dataset.label(index), dtype=torch.long))  # type: ignore[attr-defined]
        return [*item, *extras]


class IndexedSamples(Dataset):
    """``(index, dataset[index])``: a pass over the data that knows which sample is which."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]
