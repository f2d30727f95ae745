"""Run by the DDP test under torchrun: pre-train, then save this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmark.config import load_config
from benchmark.pretrain import run_pretrain
from benchmark.training.distributed import init_world, shutdown


def main() -> None:
    out, method = Path(sys.argv[1]), sys.argv[2]
    cfg = load_config(method, "demo", overrides=tuple(sys.argv[3:]), announce=False)
    world = init_world("cpu")
    try:
        result = run_pretrain(cfg, world)
        torch.save(result.method.state_dict(), out / f"rank{world.rank}.pth")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
