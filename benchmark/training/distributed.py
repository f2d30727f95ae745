"""Process-group set-up from torchrun's environment (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmark.core.contracts import World
from benchmark.core.errors import UserError


class DeviceError(UserError, RuntimeError):
    """The configured device is not there (``pretrain.device=cuda`` on a machine without one)."""


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device of this process: ``cuda`` (the ``local_rank``-th GPU), ``cpu``, or ``auto``
    (a GPU when torch sees one). Asking for ``cuda`` without a GPU is a one-line error, not
    torch's traceback at the first tensor moved."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("pretrain.device=cuda but torch sees no GPU; use device=cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"process {local_rank} of this machine has no GPU of its own (torch sees "
                f"{torch.cuda.device_count()}): start at most that many processes per machine "
                "(GPUS=...)"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_world(device_preference: str = "auto") -> World:
    """This process's place in the job; joins the process group when torchrun started us."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        # Processes on one machine share its cores; oversubscription slows everyone. A user's
        # OMP_NUM_THREADS wins outside torchrun (which sets it to 1 for its own reasons).
        share = max(1, (os.cpu_count() or 1) // max(1, local_world))
        asked = os.environ.get("OMP_NUM_THREADS", "")
        if asked.isdigit() and int(asked) > 0 and "LOCAL_RANK" not in os.environ:
            share = int(asked)
        torch.set_num_threads(share)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(world: World) -> None:
    if world.is_distributed and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(
    model: nn.Module,
    world: World,
    *,
    sync_bn: bool,
    find_unused_parameters: bool,
    broadcast_buffers: bool = True,
) -> nn.Module:
    """``model`` under DDP when the job has several processes (else ``model`` itself).

    ``sync_bn`` converts BatchNorm to SyncBatchNorm first, on CUDA only: SyncBN has no CPU
    kernel (gloo processes keep per-process statistics).
    """
    if not world.is_distributed:
        return model
    if sync_bn and world.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(
        model,
        device_ids=[world.device.index] if world.device.type == "cuda" else None,
        broadcast_buffers=broadcast_buffers,
        find_unused_parameters=find_unused_parameters,
    )
