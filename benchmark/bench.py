"""``make bench``: pre-training throughput of the harness against a bare PyTorch loop.

For every registered method, at one fixed small CPU setting, the same pre-computed view
batches go through (a) the engine's ``Pretrainer.train_epoch`` (LR schedule, autocast
context, metric accumulation, progress) and (b) a bare loop of the same networks and loss
(forward, backward, SGD step). Data loading is left out of both, so the ratio measures the
harness's own overhead. Target: harness >= 0.95 x bare.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.config import load_config
from benchmark.engine import Pretrainer, build_method
from benchmark.progress import Progress
from benchmark.registry import get_method, registered_methods
from methods.base import StepContext, World

#: The fixed setting: 64 px views, global batch 32, BN over 16, one process on the CPU.
SETTING = (
    "data.image_size=64",
    "pretrain.batch_size=32",
    "pretrain.bn_batch_size=16",
    "pretrain.device=cpu",
    "pretrain.amp_bf16=false",
    "pretrain.log_every=4",
)


def _view_batches(method, batch: int, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    from benchmark.data.synthetic import render_patch

    transform = method.views()
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(render_patch(rng, 96)[0]) for _ in range(batch)]
    batches = []
    for _ in range(steps):
        per_image = [transform(img) for img in images]
        batches.append([torch.stack(v) for v in zip(*per_image, strict=True)])
    return batches


def _harness_rate(cfg, batches) -> float:
    world = World()
    method = build_method(cfg, world)
    trainer = Pretrainer(cfg, world, method, steps_per_epoch=len(batches))
    trainer.train_epoch(batches[:2], epoch=0)  # warm-up: allocator, first-call costs
    progress = Progress(world, 0, 1, len(batches), cfg.pretrain.batch_size)
    start = time.perf_counter()
    trainer.train_epoch(batches, epoch=0, progress=progress)  # with its loss syncs and lines
    return len(batches) * cfg.pretrain.batch_size / (time.perf_counter() - start)


def _bare_rate(cfg, batches) -> float:
    method = build_method(cfg, World())
    fmt = torch.channels_last if cfg.pretrain.channels_last else torch.contiguous_format
    method.to(memory_format=fmt)
    method.train()
    opt = torch.optim.SGD(
        method.parameters(),
        lr=0.001,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    ctx = StepContext(0, 0, 1, len(batches))

    def run(bs):
        for views in bs:
            views = [v.to(memory_format=fmt) for v in views]
            loss = method(views, ctx)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(batches[:2])
    start = time.perf_counter()
    run(batches)
    return len(batches) * cfg.pretrain.batch_size / (time.perf_counter() - start)


def bench_method(name: str, steps: int, repeats: int) -> dict[str, float]:
    cfg = load_config(name, "demo", overrides=SETTING, announce=False)
    torch.manual_seed(0)
    batches = _view_batches(build_method(cfg, World()), cfg.pretrain.batch_size, steps)
    harness, bare = [], []
    for _ in range(repeats):  # interleaved so drifts in machine load hit both alike
        bare.append(_bare_rate(cfg, batches))
        harness.append(_harness_rate(cfg, batches))
    h, b = statistics.median(harness), statistics.median(bare)
    return {
        "images_per_sec": round(h, 2),
        "bare_images_per_sec": round(b, 2),
        "ratio": round(h / b, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per loop (median)")
    parser.add_argument("--methods", nargs="*", help="default: every registered method")
    args = parser.parse_args(argv)
    names = args.methods or [m for m in registered_methods() if get_method(m).pretrains]
    report: dict[str, object] = {
        "setting": {
            "overrides": list(SETTING),
            "steps": args.steps,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "methods": {},
    }
    for name in names:
        result = bench_method(name, args.steps, args.repeats)
        report["methods"][name] = result  # type: ignore[index]
        flag = "ok" if result["ratio"] >= 0.95 else "BELOW TARGET 0.95"
        print(
            f"{name:10s} harness {result['images_per_sec']:8.1f} img/s | bare "
            f"{result['bare_images_per_sec']:8.1f} img/s | ratio {result['ratio']:.3f} {flag}",
            file=sys.stderr,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"==> wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
