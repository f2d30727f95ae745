"""Per-sample augmentation seeds: views depend on (seed, epoch, index), not on the worker.

The sampler tags each index with the epoch; the dataset wrapper seeds torch's RNG from
(seed, epoch, index) around that one sample. The views are then the same whichever worker
draws the sample and however many workers there are, so a resumed run continues exactly
and the DataLoader's workers can stay alive across epochs (re-spawning 16 workers costs
seconds every epoch). Fine-tuning keys its flips the same way, by (seed, epoch, index) of
the epoch-based order under its iteration-based schedule, and resumes mid-epoch by starting
the sampler at an offset.

Only torch's RNG needs seeding here: the views (``methods/augment.py``, torchvision v1
transforms, the PIL blur's sigma) and the fine-tuning flip draw from torch alone, never from
Python's ``random`` or NumPy's global RNG, which the DataLoader seeds per worker from a base
seed that differs between an uninterrupted and a resumed run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

#: First value of every ``mix_seed`` tuple, so data and model streams never share a seed:
#: pre-training views and model draws, fine-tuning model draws and fine-tuning flips.
DATA_STREAM, MODEL_STREAM, FINETUNE_STREAM, FINETUNE_DATA_STREAM = 1, 2, 3, 4


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (NumPy's ``SeedSequence`` hash).

    Pass tuples of one fixed length per use: ``SeedSequence`` ignores trailing zeros.
    """
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


class EpochTaggedSampler(Sampler[tuple[int, int]]):
    """A ``DistributedSampler`` whose indices carry the epoch they were drawn for.

    ``set_epoch(epoch, skip)`` drops the epoch's first ``skip`` indices without loading them:
    a fine-tune resumed in the middle of an epoch continues with the very samples an
    uninterrupted run would have drawn next.
    """

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= len(self.sampler):
            raise ValueError(f"skip must be in [0, {len(self.sampler)}], got {skip}")
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        # islice calls iter(self.sampler) now, so the order is this epoch's even if the
        # epoch changes before the first index is drawn
        return ((epoch, index) for index in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


class OffStreamIteration:
    """Iterating ``loader`` draws its workers' base seed without touching torch's global RNG.

    A DataLoader draws that seed from the global RNG whenever it creates an iterator: with
    persistent workers once per process, in its first epoch, otherwise every epoch. So the
    model stream of an epoch (shuffle-BN permutations, k-means) would depend on whether the
    process started at that epoch (a resume) and on ``num_workers``. See ``epoch_batches``.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        with torch.random.fork_rng(devices=[]):
            return iter(self.loader)


def epoch_batches(loader: Iterable[Any], epoch: int) -> Iterable[Any]:
    """What to iterate in ``epoch``: only epoch 0 creates its iterator on the model stream.

    Epoch 0 keeps the one draw every run always made there (uninterrupted runs with
    persistent workers, the demo's default, stay exactly as they were); every later epoch
    creates or resets its iterator off the stream (``OffStreamIteration``), which is what a
    persistent loader always did there by drawing nothing. A run resumed at epoch k > 0 then
    continues bit-for-bit, and ``num_workers=0`` (an iterator per epoch) trains the same as
    persistent workers. The views never depend on the worker seeds (``SeededSamples``).
    """
    return loader if epoch == 0 else OffStreamIteration(loader)


class SeededSamples(Dataset):
    """Loads ``dataset[index]`` with torch's RNG seeded from (stream, seed, epoch, index).

    The caller's RNG state is restored afterwards, so loading in the main process
    (``num_workers=0``) does not disturb the model's random draws. Extras follow the sample's
    list of views, in this order: with ``with_index`` its index (methods that track samples,
    e.g. PCL), then with ``with_label`` its class, ``dataset.label(index)`` (the supervised
    reference row); each as a 0-d long tensor, so a batch carries (B,) long tensors.
    ``stream`` keeps stages apart (``FINETUNE_DATA_STREAM`` for fine-tuning flips).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        with_index: bool = False,
        with_label: bool = False,
        stream: int = DATA_STREAM,
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.stream = stream
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
            torch.manual_seed(mix_seed(self.stream, self.seed, epoch, index))
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
