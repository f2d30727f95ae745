"""The key queue of MoCo-style methods (instance keys, dense keys, concept prototypes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """FIFO ring buffer of ``size`` L2-normalised ``dim``-d keys, the negatives of InfoNCE.

    It starts as random unit vectors, as in MoCo, so the first steps have negatives.
    The original MoCo asserts ``size % global_batch == 0`` and writes one contiguous slice;
    here any ``n <= size`` is accepted and a write that crosses the end wraps around to the
    start, which is the same FIFO order when the batch divides the size. The write goes
    through modular row indices on the device, so the pointer never has to be read on the
    host (no CUDA sync per step).
    """

    queue: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got {size} and {dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def keys(self) -> Tensor:
        """A copy of the stored keys, shape (size, dim).

        A copy, because the logits keep the queue for backward and ``enqueue`` then
        overwrites it in place (MoCo's ``self.queue.clone().detach()``).
        """
        return self.queue.detach().clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor, mask: Tensor | None = None) -> None:
        """Write ``keys`` (n, dim) at the pointer, oldest first out, and advance it.

        With a boolean ``mask`` (n,) only the rows where it is True are written (in order)
        and the pointer moves by their number; the count stays on the device.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (n, {self.dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of size {self.size}")
        keys = keys.detach().to(self.queue.dtype)
        positions = torch.arange(n, device=self.queue.device)
        rows = (self.ptr + positions) % self.size
        if mask is None:
            count = torch.tensor(n, device=self.queue.device)
        else:
            # Valid rows first (stable), then rows that rewrite what is already there.
            keys = keys[torch.argsort((~mask).to(torch.uint8), stable=True)]
            count = mask.sum()
            keys = torch.where((positions < count).unsqueeze(1), keys, self.queue[rows])
        self.queue.index_copy_(0, rows, keys)
        self.ptr.copy_((self.ptr + count) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
