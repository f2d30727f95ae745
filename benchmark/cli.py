"""``concl-bench`` (also ``python -m benchmark``): the suite's command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmark import __version__
from benchmark.core.errors import UserError, one_line
from benchmark.core.schema import DATASETS


def _add_run_options(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    if method_required:
        p.add_argument("--method", "-m", required=True, help="registered method, e.g. mocov2")
    p.add_argument("--seeds", type=int, help="shorthand for finetune.seeds=N")
    p.add_argument(
        "--profile",
        default=os.environ.get("PROFILE", "auto"),
        help="paper | demo | auto (default: paper when real data is prepared, else demo)",
    )
    p.add_argument("--epochs", type=int, help="shorthand for pretrain.epochs=N")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="processes to launch with torchrun (GPUs; gloo processes on a CPU machine)",
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE", help="extra YAML layered on top"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concl-bench",
        description=(
            "Benchmark self-supervised pre-training for gland detection in pathology "
            "(ConCL, ECCV 2022): pre-train, fine-tune Mask R-CNN, track everything in MLflow."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare data under datasets/")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    gen = data_sub.add_parser(
        "generate", help="write the synthetic H&E pre-training set (NCT-CRC-HE-100K layout)"
    )
    gen.add_argument("--root", help="target folder (default: the demo profile's data.root)")
    gen.add_argument("--num-images", type=int, help="number of patches (default: demo profile)")
    gen.add_argument("--size", type=int, help="patch size in pixels (default: demo profile)")
    gen.add_argument("--seed", type=int, help="generator seed (default: demo profile)")
    prep = data_sub.add_parser(
        "prepare", help="convert a GlaS or CRAG release (or accept a COCO folder) for fine-tuning"
    )
    prep.add_argument("dataset", choices=list(DATASETS))
    prep.add_argument("--profile", default=os.environ.get("PROFILE", "auto"))
    check = data_sub.add_parser(
        "check", help="validate a prepared dataset and list every problem by file"
    )
    check.add_argument("dataset", help="glas, crag, or the path of a prepared COCO folder")
    check.add_argument("--profile", default=os.environ.get("PROFILE", "auto"))

    pre = sub.add_parser(
        "pretrain",
        help="pre-train a method (resumes the newest checkpoint of the same config)",
        description=(
            "Pre-train METHOD and export its query/online backbone as a torchvision ResNet "
            "state_dict. Re-running the same command resumes, and never makes a second MLflow "
            "run. Examples: concl-bench pretrain -m mocov2 --profile demo --epochs 2; "
            "concl-bench pretrain -m mocov2 --gpus 8 pretrain.amp_bf16=true"
        ),
    )
    _add_run_options(pre)
    pre.set_defaults(seeds=None)

    bench = sub.add_parser(
        "benchmark",
        help="pre-train, fine-tune on GlaS and CRAG for every seed, and aggregate",
        description=(
            "The whole benchmark for METHOD: pre-train (or reuse the finished pre-training of "
            "the same config), fine-tune Mask R-CNN R18-FPN on each dataset SEEDS times, "
            "evaluate COCO AP and print the results table. Re-running continues; finished "
            "seeds are never re-run. METHOD=random is the random-init baseline."
        ),
    )
    _add_run_options(bench)

    fine = sub.add_parser(
        "finetune",
        help="score any torchvision-format ResNet-18 weights with the transfer stage",
    )
    fine.add_argument("--weights", required=True, type=Path, help="backbone state_dict (.pth)")
    fine.set_defaults(method="random")
    _add_run_options(fine, method_required=False)

    export = sub.add_parser("export", help="write backbone weights for detectron2 (.pkl)")
    export.add_argument("--format", choices=["detectron2"], default="detectron2")
    export.add_argument("source", type=Path, help="torchvision ResNet state_dict (backbone.pth)")
    export.add_argument("target", type=Path, help="output .pkl")
    imp = sub.add_parser("import", help="read a detectron2 .pkl back into torchvision keys")
    imp.add_argument("source", type=Path, help="detectron2 .pkl")
    imp.add_argument("target", type=Path, help="output .pth")

    sub.add_parser("methods", help="list the registered methods")

    report = sub.add_parser(
        "report",
        help="write reports/results.md, results.csv and figures from the MLflow runs",
        description=(
            "Read every finished benchmark from MLflow and write the results table (mean "
            "[95 % bootstrap CI] over seeds with n, best per column, paired or Welch test "
            "against a baseline with Holm's correction, minimum detectable difference and "
            "seeds needed, the paper's AP beside ours), its CSV and figures; log them to a "
            "stage=report run. "
            "Demo and paper rows go to separate tables."
        ),
    )
    report.add_argument(
        "--baseline", default="mocov2", help="method every row is compared with (default mocov2)"
    )
    report.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    report.add_argument(
        "--delta",
        type=float,
        default=1.0,
        help="difference (AP / probe points) the 'seeds needed' figures are for (default 1.0)",
    )

    from benchmark.tune.cli import add_tune_parser

    add_tune_parser(sub)

    ui = sub.add_parser(
        "ui",
        help="serve the MLflow UI for the project's runs on 127.0.0.1",
        description=(
            "Start `mlflow server` on the project's tracking store (MLFLOW_TRACKING_URI, else "
            "sqlite:///mlruns/mlflow.db), bound to 127.0.0.1. Benchmarks show as parents with "
            "their pre-training and fine-tuning runs nested; Ctrl-C stops the server."
        ),
    )
    ui.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    return parser


def _data_generate(args: argparse.Namespace) -> int:

    from omegaconf import OmegaConf

    from benchmark.config import DataConfig, experiments_dir
    from benchmark.data.synthetic import write_pretrain_set

    demo = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        OmegaConf.load(experiments_dir() / "demo.yaml").get("data", {}),
    )
    root = Path(args.root or demo.root)
    n = args.num_images or demo.synthetic_images
    size = args.size or demo.synthetic_size
    seed = demo.synthetic_seed if args.seed is None else args.seed
    print(f"==> writing {n} synthetic H&E patches of {size} px to {root}", file=sys.stderr)
    write_pretrain_set(root, n, size, seed, list_file=demo.list_file or "train.txt")
    print(f"==> synthetic pre-training set ready: {root}", file=sys.stderr)
    return 0


def _torchrun(gpus: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with ``gpus`` processes on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "benchmark",
        *argv,
    ]
    print(
        f"==> launching {gpus} processes: torchrun ... -m benchmark {' '.join(argv)}",
        file=sys.stderr,
    )
    rc = subprocess.call(cmd)
    if rc:
        print(
            f"error: a torchrun worker failed (exit {rc}); see the messages above", file=sys.stderr
        )
    return rc


def _strip_gpus(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--gpus":
            skip = True
            continue
        if item.startswith("--gpus="):
            continue
        out.append(item)
    return out


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """pretrain / benchmark / finetune: validate here, then run or relaunch under torchrun."""
    from benchmark.config import ConfigError, check_layout, load_config

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"pretrain.epochs={args.epochs}")
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"finetune.seeds={args.seeds}")
    under_torchrun = "LOCAL_RANK" in os.environ
    is_main = os.environ.get("RANK", "0") == "0"
    cfg = load_config(
        args.method, args.profile, tuple(args.config), tuple(overrides), announce=is_main
    )
    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"--weights {weights} does not exist")
    if args.gpus < 1:
        raise ConfigError("--gpus / GPUS must be >= 1")
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", args.gpus)))
    if args.gpus > 1 and not under_torchrun:
        import torch

        visible = torch.cuda.device_count() if cfg.pretrain.device != "cpu" else 0
        if visible and args.gpus > visible:
            raise ConfigError(f"GPUS={args.gpus} but only {visible} CUDA devices are visible")
        return _torchrun(args.gpus, _strip_gpus(argv))

    from benchmark.training.distributed import init_world, shutdown

    world = init_world(cfg.pretrain.device)
    try:
        if args.command == "pretrain":
            from benchmark.pretrain import run_pretrain

            run_pretrain(cfg, world)
        else:
            from benchmark.pipeline import run_benchmark

            run_benchmark(cfg, world, weights=weights)
    finally:
        shutdown()
    return 0


def _export(args: argparse.Namespace) -> int:
    from benchmark.transfer.detectron2 import export_detectron2, import_detectron2

    if args.command == "export":
        export_detectron2(args.source, args.target)
    else:
        import_detectron2(args.source, args.target)
    print(f"==> wrote {args.target}", file=sys.stderr)
    return 0


def _data_prepare_or_check(args: argparse.Namespace) -> int:
    from benchmark.config import load_config
    from benchmark.data.coco import check_dataset
    from benchmark.training.distributed import init_world
    from benchmark.transfer.finetune import prepare_dataset_for

    if args.data_command == "check" and args.dataset not in DATASETS:
        root = Path(args.dataset)
    else:
        cfg = load_config("random", args.profile)
        root = prepare_dataset_for(cfg, args.dataset, init_world("cpu"))
    if args.data_command == "prepare":
        print(f"==> {args.dataset} ready for fine-tuning: {root}", file=sys.stderr)
        return 0
    problems = check_dataset(root)
    for problem in problems:
        print(problem)
    print(f"==> {root}: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _methods() -> int:
    from benchmark.core.registry import get_method, registered_methods

    for name in registered_methods():
        doc = (get_method(name).__doc__ or "").strip().splitlines()
        print(f"{name:10s} {doc[0] if doc else ''}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from benchmark.config import TrackingConfig
    from benchmark.report import build_report

    tracking = TrackingConfig()
    result = build_report(
        tracking.uri, tracking.experiment, args.out, baseline=args.baseline, delta=args.delta
    )
    print(
        f"==> report: {result.markdown}, {result.csv} and {len(result.figures)} figures "
        f"(MLflow run {result.run_id})",
        file=sys.stderr,
    )
    return 0


def _ui(args: argparse.Namespace) -> int:
    from benchmark.config import ConfigError, TrackingConfig
    from benchmark.ui import DEFAULT_HOST, port_in_use, server_command

    if not 0 < args.port < 65536:
        raise ConfigError(f"PORT={args.port} is not a TCP port (1-65535)")
    if port_in_use(args.port):
        raise ConfigError(
            f"port {args.port} on {DEFAULT_HOST} is in use (a UI already running?); "
            f"open http://{DEFAULT_HOST}:{args.port} or pick another with PORT=…"
        )
    cmd = server_command(args.port, artifact_root=TrackingConfig.artifact_root)
    print(
        f"==> MLflow UI: http://{DEFAULT_HOST}:{args.port} (store {cmd[5]}); Ctrl-C stops it",
        file=sys.stderr,
    )
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            if args.data_command == "generate":
                return _data_generate(args)
            return _data_prepare_or_check(args)
        if args.command in ("pretrain", "benchmark", "finetune"):
            return _run(args, argv)
        if args.command in ("export", "import"):
            return _export(args)
        if args.command == "methods":
            return _methods()
        if args.command == "ui":
            return _ui(args)
        if args.command == "report":
            return _report(args)
        if args.command == "tune":
            from benchmark.tune.cli import tune_command

            return tune_command(args)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(
                "interrupted: checkpoints written so far are kept; run the same command again "
                "to continue",
                file=sys.stderr,
            )
        return 130
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
