"""``make bench``: pre-training throughput of the harness against a bare PyTorch loop.

For every registered method, at one fixed small CPU setting, the same pre-computed view
batches go through (a) the engine's ``Pretrainer.train_epoch`` (LR schedule, autocast
context, metric accumulation, progress) and (b) a bare loop of the same networks and loss
(forward, backward, SGD step). Data loading is left out of both, so the ratio measures the
harness's own overhead. Target: harness >= 0.95 x bare.

Second, the cost of a training step of each method relative to MoCo-v2 at the paper's view
size (224 px: ConCL clusters a 14×14 map and pools 7×7 grids), same batch, bare loop,
methods interleaved. Targets: ConCL <= 1.3 x MoCo-v2 (its reference-view forward alone
costs about 1.25 x, so clustering and matching must be nearly free), DenseCL <= 1.1 x.
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
from benchmark.core.contracts import StepContext, World
from benchmark.core.registry import get_method, registered_methods
from benchmark.pretrain import Pretrainer, build_method
from benchmark.training.loop import OnLog
from benchmark.training.optim import build_optimizer
from benchmark.training.progress import Progress

#: The fixed setting: 64 px views, global batch 32, BN over 16, one process on the CPU.
SETTING = (
    "data.image_size=64",
    "pretrain.batch_size=32",
    "pretrain.bn_batch_size=16",
    "pretrain.device=cpu",
    "pretrain.amp_bf16=false",
    "pretrain.log_every=4",
)
#: Per-method additions: ConCL and PCL are measured with their concept/prototype loss on.
METHOD_SETTING: dict[str, tuple[str, ...]] = {
    "concl": ("method.warmup_epochs=0",),
    "pcl": ("method.warmup_epochs=0",),
}
#: Step-cost targets relative to MoCo-v2 (issue 4).
STEP_COST_TARGETS = {"concl": 1.3, "densecl": 1.1}


def view_batches(
    method, batch: int, steps: int, seed: int = 0, size: int = 96
) -> list[list[torch.Tensor]]:
    """``steps`` batches of views of ``batch`` synthetic patches, laid out as the engine's
    loader lays them out: views, then indices and labels for methods that want them."""
    from benchmark.data.synthetic import dominant_type, render_patch

    transform = method.views()
    rng = np.random.default_rng(seed)
    patches = [render_patch(rng, size) for _ in range(batch)]
    images = [Image.fromarray(rgb) for rgb, _ in patches]
    labels = torch.tensor([dominant_type(label_map) for _, label_map in patches])
    batches = []
    for _ in range(steps):
        per_image = [transform(img) for img in images]
        views = [torch.stack(v) for v in zip(*per_image, strict=True)]
        if method.wants_sample_index:
            views.append(torch.arange(batch))
        if method.wants_labels:
            views.append(labels)
        batches.append(views)
    return batches


def build_bench_method(cfg, world: World):
    """``build_method`` for synthetic patches: a method that wants labels gets their classes."""
    from benchmark.data.synthetic import TISSUE_TYPES

    return build_method(cfg, world, num_classes=len(TISSUE_TYPES))


def prime(method, count: int, size: int = 96, seed: int = 1) -> None:
    """Run a method's dataset pass once over ``count`` synthetic patches, then no more.

    The bench times training steps; PCL's per-epoch clustering is a separate cost (logged
    as ``dataset_pass_time_s`` in real runs), so it is done once up front, in every loop.
    Call it after the method is on its device.
    """
    from benchmark.data.synthetic import render_patch

    ctx = StepContext(0, 0, 1, 1)
    if not method.wants_dataset_pass(ctx):
        return
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(render_patch(rng, size)[0]) for _ in range(count)]
    view = method.eval_view()
    device = next(method.parameters()).device
    batch = (torch.arange(len(images), device=device), torch.stack([view(i) for i in images]))
    method.on_dataset_pass([batch], len(images), ctx)
    method.train()
    method.wants_dataset_pass = lambda ctx: False  # type: ignore[method-assign]


def _harness_rate(cfg, batches) -> float:
    world = World()
    method = build_bench_method(cfg, world)
    trainer = Pretrainer(cfg, world, method, steps_per_epoch=len(batches))
    prime(method, cfg.pretrain.batch_size)
    trainer.train_epoch(batches[:2], epoch=0)  # warm-up: allocator, first-call costs
    progress = Progress(world, 0, 1, len(batches), cfg.pretrain.batch_size)
    start = time.perf_counter()
    trainer.train_epoch(batches, epoch=0, progress=progress)  # with its loss syncs and lines
    return len(batches) * cfg.pretrain.batch_size / (time.perf_counter() - start)


def _bare_optimizer(cfg, method) -> torch.optim.Optimizer:
    o = cfg.optim
    return build_optimizer(
        o.name, method.param_groups(), 0.001, o.momentum, o.weight_decay, o.trust_coefficient
    )


def _bare_rate(cfg, batches) -> float:
    method = build_bench_method(cfg, World())
    prime(method, cfg.pretrain.batch_size)
    fmt = torch.channels_last if cfg.pretrain.channels_last else torch.contiguous_format
    method.to(memory_format=fmt)
    method.train()
    opt = _bare_optimizer(cfg, method)
    ctx = StepContext(0, 0, 1, len(batches))

    def run(bs):
        for views in bs:
            views = [v.to(memory_format=fmt) if v.dim() == 4 else v for v in views]
            loss = method(views, ctx)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.on_step_end(ctx)

    run(batches[:2])
    start = time.perf_counter()
    run(batches)
    return len(batches) * cfg.pretrain.batch_size / (time.perf_counter() - start)


def _config(name: str, *overrides: str):
    return load_config(
        name,
        "demo",
        overrides=(*SETTING, *METHOD_SETTING.get(name, ()), *overrides),
        announce=False,
    )


def bench_method(name: str, steps: int, repeats: int) -> dict[str, float]:
    cfg = _config(name)
    torch.manual_seed(0)
    batches = view_batches(build_bench_method(cfg, World()), cfg.pretrain.batch_size, steps)
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


def _bare_step_time(cfg, method, batches: list[list[torch.Tensor]]) -> float:
    """Median seconds of one training step (forward, backward, the method's optimizer and
    its post-step hook) over ``batches``, after one untimed step."""
    opt = _bare_optimizer(cfg, method)
    ctx = StepContext(0, 0, 1, len(batches))
    times = []
    for i, views in enumerate([batches[0], *batches]):
        start = time.perf_counter()
        loss = method(views, ctx)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(ctx)
        if i:  # the first call pays allocator and first-use costs
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step_cost(
    names: list[str], size: int, batch: int, steps: int, repeats: int
) -> dict[str, object]:
    """Seconds per bare training step of each method and its ratio to MoCo-v2's."""
    setting = (
        f"data.image_size={size}",
        f"pretrain.batch_size={batch}",
        f"pretrain.bn_batch_size={batch}",
    )
    names = ["mocov2", *[n for n in names if n != "mocov2"]]
    methods, batches, configs = {}, {}, {}
    for name in names:
        cfg = _config(name, *setting)
        configs[name] = cfg
        methods[name] = build_bench_method(cfg, World()).train()
        prime(methods[name], batch, size=max(size, 96))
        batches[name] = view_batches(methods[name], batch, steps, size=max(size, 96))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):  # interleaved, so load drifts hit every method alike
        for name in names:
            seconds[name].append(_bare_step_time(configs[name], methods[name], batches[name]))
    per_step = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "setting": {"image_size": size, "batch": batch, "steps": steps, "repeats": repeats},
        "seconds_per_step": {n: round(v, 4) for n, v in per_step.items()},
        "relative_to_mocov2": {n: round(v / per_step["mocov2"], 4) for n, v in per_step.items()},
        "targets": STEP_COST_TARGETS,
    }


def bench_finetune(tmp: Path, warmup: int, steps: int) -> dict[str, float]:
    """Fine-tuning iterations/s of ``finetune`` (the harness) and of a bare torchvision loop.

    Demo setting (synthetic GlaS 192x256, 4 images per iteration, demo sampling), CPU. The
    harness rate is measured over the last ``steps`` iterations (after ``warmup``) from its
    own logging; the bare loop runs the same model on batches loaded beforehand.
    """
    import os

    from benchmark.data.coco import CocoInstances, collate
    from benchmark.transfer.finetune import finetune, prepare_dataset_for
    from benchmark.transfer.model import build_mask_rcnn, param_groups

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    total = warmup + steps
    cfg = load_config(
        "random",
        "demo",
        overrides=(
            f"finetune.glas.raw_root={tmp}/raw",
            f"finetune.glas.root={tmp}/coco",
            f"finetune.glas.iterations={total}",
            f"finetune.glas.steps=[{total - 1}]",
            f"finetune.log_every={warmup}"
            if steps % warmup == 0
            else f"finetune.log_every={total}",
            "finetune.num_workers=0",
        ),
        announce=False,
    )
    f, d = cfg.finetune, cfg.finetune.glas
    rates: list[float] = []
    result = finetune(
        cfg,
        "glas",
        1,
        None,
        World(),
        tmp / "ft",
        [OnLog(lambda m, it: rates.append(m["images_per_sec"]))],
    )
    harness = statistics.fmean(rates[1:]) if len(rates) > 1 else rates[0]

    root = prepare_dataset_for(cfg, "glas", World())
    data = CocoInstances(root, "train", train=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=f.batch_size, collate_fn=collate, shuffle=True, drop_last=True
    )
    batches = []
    while len(batches) < total:
        batches.extend(loader)
    model = build_mask_rcnn(
        min_size_train=tuple(d.min_size_train),
        min_size_test=d.min_size_test,
        max_size=d.max_size,
        rpn_pre_nms_top_n_train=f.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=f.rpn_post_nms_top_n_train,
        box_batch_size_per_image=f.box_batch_size_per_image,
    )
    model.train()
    opt = torch.optim.SGD(param_groups(model, f.weight_decay), lr=0.001, momentum=f.momentum)
    start = 0.0
    for i, (images, targets) in enumerate(batches[:total]):
        if i == warmup:
            start = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    bare = steps * f.batch_size / (time.perf_counter() - start)
    return {
        "images_per_sec": round(harness, 3),
        "bare_images_per_sec": round(bare, 3),
        "ratio": round(harness / bare, 4),
        "eval_time_s": round(result.metrics["eval_time_s"], 2),
        "eval_images": len(CocoInstances(root, "test", train=False)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per loop (median)")
    parser.add_argument("--methods", nargs="*", help="default: every registered method")
    parser.add_argument("--finetune-warmup", type=int, default=3)
    parser.add_argument("--finetune-steps", type=int, default=16)
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning bench")
    parser.add_argument("--step-size", type=int, default=224, help="view size of the step cost")
    parser.add_argument("--step-batch", type=int, default=16, help="batch of the step cost")
    parser.add_argument("--step-steps", type=int, default=4, help="timed steps per step cost")
    parser.add_argument("--no-step-cost", action="store_true", help="skip the step-cost bench")
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
    if not args.no_step_cost:
        cost = bench_step_cost(
            names, args.step_size, args.step_batch, args.step_steps, args.repeats
        )
        report["step_cost"] = cost
        for name, ratio in cost["relative_to_mocov2"].items():  # type: ignore[union-attr]
            target = STEP_COST_TARGETS.get(name)
            flag = "" if target is None else ("ok" if ratio <= target else "ABOVE TARGET")
            bound = f"(target <= {target})" if target else ""
            print(
                f"{name:10s} step {cost['seconds_per_step'][name]:.3f} s at "  # type: ignore[index]
                f"{args.step_size} px, batch {args.step_batch} | {ratio:.3f} x MoCo-v2 "
                f"{bound} {flag}",
                file=sys.stderr,
            )
    if not args.no_finetune:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = bench_finetune(Path(tmp), args.finetune_warmup, args.finetune_steps)
        report["finetune"] = result
        flag = "ok" if result["ratio"] >= 0.95 else "BELOW TARGET 0.95"
        print(
            f"finetune   harness {result['images_per_sec']:8.2f} img/s | bare "
            f"{result['bare_images_per_sec']:8.2f} img/s | ratio {result['ratio']:.3f} {flag} | "
            f"eval {result['eval_time_s']:.1f} s for {result['eval_images']} images",
            file=sys.stderr,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"==> wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
