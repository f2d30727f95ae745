from __future__ import annotations

import pytest
import torch

from benchmark.core.errors import UserError
from benchmark.training.distributed import DeviceError, resolve_device


def test_cuda_without_a_gpu_is_one_line_saying_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    assert isinstance(err.value, UserError)
    assert str(err.value) == "pretrain.device=cuda but torch sees no GPU; use device=cpu or auto"
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="process 2 of this machine has no GPU of its own"):
        resolve_device("auto", local_rank=2)
