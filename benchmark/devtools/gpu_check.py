"""``make gpu-check``: a short, printed health check of the suite on a CUDA machine.

CUDA and bf16 autocast work; every registered method trains a few steps at the paper's
per-process setting (224 px, batch 256 on one GPU, BN over groups of 32) in fp32 and in
bf16 + channels_last, with throughput and peak memory; the image pipeline's throughput;
and one short end-to-end demo pre-training on the GPU. Never part of the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.core.registry import get_method, registered_methods
from benchmark.devtools.bench import METHOD_SETTING, build_bench_method, prime, view_batches
from benchmark.pretrain import Pretrainer, build_loader, build_method, run_pretrain


def _say(msg: str) -> None:
    print(msg, flush=True)


def _sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


def method_throughput(name: str, world: World, batch: int, steps: int, amp: bool, cl: bool) -> str:
    cfg = load_config(
        name,
        "paper",
        overrides=(
            f"pretrain.device={world.device.type}",
            f"pretrain.batch_size={batch}",
            f"pretrain.amp_bf16={str(amp).lower()}",
            f"pretrain.channels_last={str(cl).lower()}",
            *METHOD_SETTING.get(name, ()),
        ),
        announce=False,
    )
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method = build_bench_method(cfg, world)
    size = cfg.data.image_size
    # Real views of synthetic patches: methods such as ConCL need their crop boxes too.
    views = [v.to(world.device) for v in view_batches(method, batch, 1, size=size)[0]]
    trainer = Pretrainer(cfg, world, method, steps_per_epoch=steps)
    prime(method, batch, size=size)  # PCL: one clustering, so its step has prototypes
    warm = trainer.train_epoch([views] * 3, epoch=0)
    start = time.perf_counter()
    out = trainer.train_epoch([views] * steps, epoch=0)
    _sync(world)
    rate = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if world.device.type == "cuda" else 0.0
    ok = all(torch.isfinite(torch.tensor(v)) for v in (warm["loss"], out["loss"]))
    return (
        f"{name:8s} bf16={amp!s:5s} channels_last={cl!s:5s} batch {batch} @ {size}px: "
        f"{rate:8.1f} img/s, peak {peak:5.1f} GiB, loss {out['loss']:.4f} finite={ok}"
    )


def loader_throughput(name: str, world: World, root: Path, workers: int, batch: int) -> str:
    from benchmark.data.pretrain import PretrainImageDataset

    cfg = load_config(
        name,
        "paper",
        overrides=(
            f"data.root={root}",
            f"data.num_workers={workers}",
            f"pretrain.batch_size={batch}",
        ),
        announce=False,
    )
    dataset = PretrainImageDataset(root)
    method = build_method(
        cfg, World(), len(dataset.classes) if get_method(name).wants_labels else None
    )
    dataset.transform = method.views()
    n, first, start = 0, None, time.perf_counter()
    for views in build_loader(cfg, World(), dataset, with_label=method.wants_labels):
        if first is None:
            first = time.perf_counter()
        else:
            n += views[0].shape[0]
    end = time.perf_counter()
    rate = n / max(end - (first or end), 1e-9)
    startup = (first or end) - start
    return (
        f"{name:8s} data pipeline ({workers} workers, 224 px views): {rate:8.1f} img/s steady, "
        f"{startup:.1f} s to the first batch"
    )


def finetune_check(tmp: Path, world: World, weights: Path, workers: int, args) -> None:
    """A short GlaS-sized fine-tune (paper recipe, synthetic 522x775 images), then COCO eval."""
    from benchmark.transfer.finetune import finetune

    on_gpu = world.device.type == "cuda"
    cfg = load_config(
        "random",
        "paper",
        overrides=(
            f"finetune.glas.raw_root={tmp / 'glas_raw'}",
            f"finetune.glas.root={tmp / 'glas_coco'}",
            "finetune.glas.synthetic=true",
            "finetune.glas.synthetic_train=32",
            "finetune.glas.synthetic_test=16",
            f"finetune.glas.synthetic_height={522 if on_gpu else 96}",
            f"finetune.glas.synthetic_width={775 if on_gpu else 128}",
            f"finetune.glas.iterations={args.finetune_iters}",
            f"finetune.glas.steps=[{args.finetune_iters - 1}]",
            *(
                ()
                if on_gpu
                else (
                    "finetune.glas.min_size_train=[80,96]",
                    "finetune.glas.min_size_test=96",
                    "finetune.glas.max_size=128",
                )
            ),
            f"finetune.batch_size={16 if on_gpu else 2}",
            "finetune.warmup_iters=5",
            "finetune.precise_bn_iters=10",
            f"finetune.amp_bf16={str(on_gpu).lower()}",
            f"finetune.num_workers={workers}",
            f"finetune.log_every={max(1, args.finetune_iters // 4)}",
            f"pretrain.device={world.device.type}",
        ),
        announce=False,
    )
    start = time.perf_counter()
    result = finetune(cfg, "glas", 1, weights, world, tmp / "finetune" / "glas" / "seed1")
    m = result.metrics
    _say(
        f"finetune glas ({world.device.type}, batch {cfg.finetune.batch_size}, "
        f"bf16={on_gpu}): {args.finetune_iters} iterations + precise BN + eval in "
        f"{time.perf_counter() - start:.1f} s; eval {m['eval_time_s']:.1f} s; "
        f"bbox AP {m['bbox_AP']:.1f}, segm AP {m['segm_AP']:.1f}"
    )


def pretraining_methods() -> list[str]:
    return [m for m in registered_methods() if get_method(m).pretrains]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="synthetic patches for I/O check")
    parser.add_argument("--device", default="cuda", help="cpu runs the same checks as a dry run")
    parser.add_argument("--epochs", type=int, default=2, help="end-to-end pre-training epochs")
    parser.add_argument("--finetune-iters", type=int, default=40)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        _say("gpu-check: no CUDA device visible; nothing to check")
        return 1
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    world = World(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        props = torch.cuda.get_device_properties(dev)
        _say(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability "
            f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
    a = torch.randn(2048, 2048, device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        _sync(world)
        start = time.perf_counter()
        for _ in range(20):
            x @ x
        _sync(world)
        tflops = 20 * 2 * 2048**3 / (time.perf_counter() - start) / 1e12
        _say(f"matmul 2048^2 {str(dtype):15s}: {tflops:7.2f} TFLOP/s")
    for name in pretraining_methods():
        for amp, cl in ((False, False), (True, False), (True, True)):
            _say(method_throughput(name, world, args.batch, args.steps, amp, cl))

    with tempfile.TemporaryDirectory() as tmp:
        from benchmark.data.synthetic import write_pretrain_set

        root = Path(tmp) / "nct"
        start = time.perf_counter()
        write_pretrain_set(root, args.images, 224, 0)
        _say(f"synthetic data: {args.images} patches in {time.perf_counter() - start:.1f} s")
        workers = min(16, os.cpu_count() or 1)
        for name in pretraining_methods():
            _say(loader_throughput(name, world, root, workers, args.batch))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        sizes = {
            "demo-size": (),
            "paper-size": (
                "data.image_size=224",
                f"pretrain.batch_size={args.batch}",
                "pretrain.bn_batch_size=32",
                "pretrain.channels_last=false",
            ),
        }
        for name in pretraining_methods():
            for label, extra in sizes.items():
                cfg = load_config(
                    name,
                    "demo",
                    overrides=(
                        f"data.root={root}",
                        "data.synthetic=false",
                        "data.list_file=null",
                        f"data.num_workers={workers}",
                        f"pretrain.device={dev.type}",
                        f"pretrain.amp_bf16={str(dev.type == 'cuda').lower()}",
                        f"pretrain.epochs={args.epochs}",
                        f"output_root={tmp}/out",
                        *extra,
                    ),
                    announce=False,
                )
                start = time.perf_counter()
                result = run_pretrain(cfg, world)
                _say(
                    f"{name:8s} end-to-end {label} pre-training ({dev.type}): "
                    f"{result.epochs_done} epochs in {time.perf_counter() - start:.1f} s; "
                    f"backbone exported: {result.backbone_path.is_file()}"
                )
        finetune_check(Path(tmp), world, result.backbone_path, workers, args)
    _say("gpu-check: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
