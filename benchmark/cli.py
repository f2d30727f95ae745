"""``concl-bench`` (also ``python -m benchmark``): the suite's command line."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from benchmark import __version__
from benchmark.core.errors import UserError, one_line
from benchmark.core.schema import DATASETS, PORT_ENV, PROFILE_ENV

if TYPE_CHECKING:
    from omegaconf import DictConfig


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the suite's one line (``error: ...``, exit 2) and a
    pointer to ``--help``, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; `{self.prog} --help` lists the options\n")


def _add_run_options(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    if method_required:
        p.add_argument("--method", "-m", required=True, help="registered method, e.g. mocov2")
    p.add_argument("--seeds", type=int, help="shorthand for finetune.seeds=N")
    p.add_argument(
        "--profile",
        default=os.environ.get(PROFILE_ENV, "auto"),
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
    parser = _Parser(
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
    check = data_sub.add_parser(
        "check", help="validate a dataset (raw release, then its conversion) and list every problem"
    )
    check.add_argument("dataset", help="glas, crag, or the path of a prepared COCO folder")
    for p in (prep, check):
        p.add_argument("--profile", default=os.environ.get(PROFILE_ENV, "auto"))
        p.add_argument(
            "--raw-root",
            type=Path,
            help="the release folder (or a folder above it); same as finetune.<dataset>.raw_root",
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

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
    fine.add_argument(
        "--weights",
        required=True,
        help="ResNet-18 weights: a torchvision state_dict (.pth), a detectron2 .pkl, or a "
        "registered backbone models:/<name>/<version> (or models:/<name>@<alias>)",
    )
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
    ui.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port on 127.0.0.1 (default: ${PORT_ENV}, else 5000)",
    )
    return parser


def _data_generate(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from benchmark.config import ConfigError, DataConfig, experiments_dir
    from benchmark.data.synthetic import write_pretrain_set

    demo = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        OmegaConf.load(experiments_dir() / "demo.yaml").get("data", {}),
    )
    root = Path(args.root or demo.root)
    # `is None`, not `or`: an explicit 0 is a mistake to refuse, not "use the default"
    n = demo.synthetic_images if args.num_images is None else args.num_images
    size = demo.synthetic_size if args.size is None else args.size
    seed = demo.synthetic_seed if args.seed is None else args.seed
    if n < 1:
        raise ConfigError(
            f"--num-images {n}: the set needs at least 1 image (leave it out for the demo's "
            f"{demo.synthetic_images})"
        )
    if size < 8:
        raise ConfigError(
            f"--size {size}: patches must be at least 8 px (leave it out for the demo's "
            f"{demo.synthetic_size})"
        )
    if seed < 0:
        raise ConfigError(f"--seed {seed}: the generator takes seeds >= 0")
    check_writable(root, "--root", "--root=…")
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):  # else kept or refused
        print(f"==> writing {n} synthetic H&E patches of {size} px to {root}", file=sys.stderr)
    write_pretrain_set(root, n, size, seed, list_file=demo.list_file or "train.txt")
    print(f"==> synthetic pre-training set ready: {root}", file=sys.stderr)
    return 0


#: How long torchrun and its workers get to end their runs after a stop signal (torchrun
#: itself waits 30 s for its workers) before whatever is left is killed.
TREE_STOP_TIMEOUT_S = 60.0


def _torchrun(gpus: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with ``gpus`` processes on this machine; a stop
    signal (or this process's death) ends torchrun and every worker."""
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
    from benchmark.ui import supervise

    # Not subprocess.call: a SIGTERM to this process would leave torchrun and its workers
    # (each in a session of its own) running, and Ctrl-C would SIGKILL torchrun before it
    # stopped them. SIGINT lets every worker end its runs as KILLED, as a Ctrl-C does.
    result = supervise([cmd], interrupt=signal.SIGINT, timeout=TREE_STOP_TIMEOUT_S)
    if result.stopped_by is not None:
        raise KeyboardInterrupt
    rc = result.codes[0]
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


@contextlib.contextmanager
def _checking() -> Iterator[None]:
    """Hold what the checks print on stderr (a release found a level down, say) until they
    pass: a refused input is its one ``error:`` line. Shown before any other failure."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except UserError:
        raise
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())
    sys.stderr.flush()


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """pretrain / benchmark / finetune: validate here, then run or relaunch under torchrun.
    The profile line comes once every check passed: a refused input prints only its error."""
    from benchmark.config import ConfigError, announce_profile, check_layout, load_config

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"pretrain.epochs={args.epochs}")
    if getattr(args, "seeds", None) is not None:
        overrides.append(f"finetune.seeds={args.seeds}")
    under_torchrun = "LOCAL_RANK" in os.environ
    is_main = os.environ.get("RANK", "0") == "0"
    relaunch = args.gpus > 1 and not under_torchrun
    weights_arg = getattr(args, "weights", None)
    with _checking():
        cfg = load_config(
            args.method, args.profile, tuple(args.config), tuple(overrides), announce=False
        )
        if args.gpus < 1:
            raise ConfigError(f"--gpus / GPUS must be >= 1 (got {args.gpus})")
        check_layout(cfg, int(os.environ.get("WORLD_SIZE", args.gpus)))
        weights = _weights_path(cfg, weights_arg)
        _preflight(cfg, args.command, weights)
        if is_main:  # the store last: a fresh one is made here, once nothing else is wrong
            from benchmark.tracking import tracking_uri

            tracking_uri(cfg.tracking.uri)
        if relaunch:
            import torch

            visible = torch.cuda.device_count() if cfg.pretrain.device != "cpu" else 0
            if visible and args.gpus > visible:
                raise ConfigError(f"GPUS={args.gpus} but only {visible} CUDA devices are visible")
    if is_main:
        announce_profile(args.profile)
    if relaunch:
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


def check_writable(path: Path, what: str, fix: str) -> None:
    """Raise a one-line ConfigError unless files can be written at ``path``: in it when it is
    a folder, else in its nearest existing parent (where the missing folders would be made).

    A probe file (or folder) is made and removed at once, and the folder's times are put
    back, so a refused or later failing run leaves the tree exactly as it was. This catches
    read-only mounts, missing permissions and paths under a file before any work, instead of
    a traceback hours in (or after runs were marked RUNNING)."""
    from benchmark.config import ConfigError

    path = Path(path)
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == path else f"lies under {probe}, which is"
        raise ConfigError(f"{what} {path} {where} a file, not a folder: choose {fix}")
    try:
        times = probe.stat()
        if probe == path:
            fd, name = tempfile.mkstemp(prefix=".concl-bench-write-check-", dir=probe)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".concl-bench-write-check-", dir=probe))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        cannot = "write in" if probe == path else f"create {path} under"
        raise ConfigError(
            f"{what} {path} is not writable (cannot {cannot} {probe}: {reason}): choose {fix}"
        ) from None
    with contextlib.suppress(OSError):  # the probe worked; at worst the folder's times moved
        os.utime(probe, ns=(times.st_atime_ns, times.st_mtime_ns))


def _weights_path(cfg: DictConfig, weights: str | None) -> Path | None:
    """``--weights`` as a file: a ``models:/`` URI is read from the registry of the tracking
    store once (into ``output_root/registry/``), so the run scores the same file later."""
    if weights is None:
        return None
    from benchmark.registry import fetch_backbone, is_model_uri

    if not is_model_uri(weights):
        return Path(weights)
    from benchmark.tracking import resolve_tracking_uri

    check_writable(Path(cfg.output_root), "output_root", "a writable output_root=…")
    # read only: a wrong URI must leave the store as it was (no set-up, no lock file)
    return fetch_backbone(resolve_tracking_uri(cfg.tracking.uri), weights, Path(cfg.output_root))


def _preflight(cfg: DictConfig, command: str, weights: Path | None) -> None:
    """Every check that needs no work, before any: weights, the folders the run will write,
    the data it will read and batches that fit it, the results and checkpoints of an earlier
    run it will read back. A failure here is one line and leaves the MLflow store and every
    folder as they were."""
    from benchmark.core.registry import get_method
    from benchmark.training.distributed import resolve_device

    resolve_device(cfg.pretrain.device)  # pretrain.device=cuda on a machine without a GPU
    check_writable(Path(cfg.output_root), "output_root", "a writable output_root=…")
    if weights is not None:
        from benchmark.transfer.model import check_backbone_file

        check_backbone_file(weights)
    elif command in ("pretrain", "benchmark") and get_method(cfg.method.name).pretrains:
        _check_pretrain_data(cfg)
    if command == "pretrain":
        return
    for name in cfg.finetune.datasets:
        _check_transfer_data(cfg, name)
    tissue = [p for p in cfg.probe.probes if p in ("knn", "linear")]
    t = cfg.probe.tissue
    if tissue and t.synthetic:
        for key in ("train_root", "test_root"):
            if not _complete(t[key]):
                check_writable(Path(t[key]), f"probe.tissue.{key}", f"a writable {key}")
    _check_read_back(cfg, weights)


def _complete(root: str | Path) -> bool:
    from benchmark.data.markers import read_marker

    return read_marker(Path(root)) is not None


def _check_pretrain_data(cfg: DictConfig) -> None:
    """The pre-training images exist (or can be generated) and hold one global batch, and
    the checkpoint a resume would read is one; not needed when this config's pre-training
    already finished."""
    from benchmark.config import ConfigError, pretrain_hash
    from benchmark.data.pretrain import PretrainImageDataset
    from benchmark.pretrain import BACKBONE_FILE, DONE_FILE
    from benchmark.training.checkpoints import CheckpointManager, load_checkpoint, run_dir

    directory = run_dir(cfg.output_root, cfg.method.name, pretrain_hash(cfg))
    if (directory / DONE_FILE).is_file() and (directory / BACKBONE_FILE).is_file():
        return
    latest = CheckpointManager(directory, "epoch", writer=False).latest()
    if latest is not None:  # the one a resume reads: damaged, it stops before any run is made
        load_checkpoint(latest, ("epoch", "model", "optimizer"))
    d = cfg.data
    if d.synthetic:  # its size is checked with the config; it only has to be writable
        if not _complete(d.root):
            check_writable(Path(d.root), "data.root", "a writable data.root=…")
        return
    count = len(PretrainImageDataset(d.root, d.list_file))
    batch = cfg.pretrain.batch_size
    if batch > count:
        raise ConfigError(
            f"pretrain.batch_size={batch} is larger than the {count} pre-training images in "
            f"{d.root}: lower pretrain.batch_size to at most {count}, or add images"
        )


def _check_read_back(cfg: DictConfig, weights: Path | None) -> None:
    """What a benchmark reads back of an earlier run: every probe's and (dataset, seed)'s
    ``metrics.json``, and the newest ``iter_*.pth`` of each seed not scored yet (the one its
    resume loads). Damaged, they stopped it only once pre-training and the probes had run
    (with its runs set RUNNING); the paths need nothing but the config (and the weights'
    digest). Only a seed a kill stopped has a checkpoint without ``metrics.json``: about
    one torch.load on the CPU (model and optimizer, ~0.25 GB; under a second)."""
    from benchmark.pipeline import probe_dir, transfer_dir
    from benchmark.probe.stage import scored_probes
    from benchmark.training.checkpoints import CheckpointManager, load_checkpoint
    from benchmark.transfer.finetune import read_metrics

    external = weights is not None
    if cfg.probe.probes:
        scored_probes(cfg, probe_dir(cfg, weights, external))
    base = transfer_dir(cfg, weights, external)
    for name in cfg.finetune.datasets:
        for seed in range(1, cfg.finetune.seeds + 1):
            out_dir = base / name / f"seed{seed}"
            if read_metrics(out_dir) is not None:
                continue
            latest = CheckpointManager(out_dir, "iter", writer=False).latest()
            if latest is not None:  # the keys finetune() resumes from
                load_checkpoint(latest, ("model", "optimizer", "iteration"))


def _check_transfer_data(cfg: DictConfig, name: str) -> None:
    """A real GlaS/CRAG is in place (found now, not after hours of pre-training) and holds
    one fine-tuning batch; the folders its conversion (or synthetic set) goes to are
    writable."""
    from benchmark.config import ConfigError
    from benchmark.data.coco import check_before_conversion, locate_release, train_image_count

    d = cfg.finetune[name]
    prefix = f"finetune.{name}"
    if d.synthetic:
        if not _complete(d.raw_root):
            check_writable(
                Path(d.raw_root), f"{prefix}.raw_root", f"a writable {prefix}.raw_root=…"
            )
        if not _complete(d.root):
            check_writable(Path(d.root), f"{prefix}.root", f"a writable {prefix}.root=…")
        return
    found = locate_release(name, Path(d.raw_root), skip=Path(d.root))
    check_before_conversion(name, found, Path(d.root))
    count = train_image_count(name, found)
    batch = cfg.finetune.batch_size
    if count is not None and batch > count:
        raise ConfigError(
            f"finetune.batch_size={batch} is larger than the {count} {name} training images in "
            f"{found}: lower finetune.batch_size to at most {count}"
        )
    if found != Path(d.root) and not _complete(d.root) and not (found / "annotations").is_dir():
        check_writable(Path(d.root), f"{prefix}.root", f"a writable {prefix}.root=…")


def _export(args: argparse.Namespace) -> int:
    from benchmark.transfer.detectron2 import export_detectron2, import_detectron2

    check_writable(Path(args.target).parent, "the target folder", "another target path")
    if args.command == "export":
        export_detectron2(args.source, args.target)
    else:
        import_detectron2(args.source, args.target)
    print(f"==> wrote {args.target}", file=sys.stderr)
    return 0


def _data_prepare_or_check(args: argparse.Namespace) -> int:
    """``data prepare`` converts (or generates, in the demo) one dataset; ``data check``
    lists the problems of a raw release first (exit 1), then those of its conversion."""
    from benchmark.config import announce_profile, load_config
    from benchmark.data.coco import (
        check_before_conversion,
        check_dataset,
        check_raw,
        locate_release,
    )
    from benchmark.data.pretrain import DatasetError
    from benchmark.training.distributed import init_world
    from benchmark.transfer.finetune import prepare_dataset_for

    if args.data_command == "check" and args.dataset not in DATASETS:
        root = Path(args.dataset)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetError(
                f"{root} {what}: give glas, crag or the path of a prepared COCO folder"
            )
    else:
        with _checking():
            cfg = load_config("random", args.profile, (), tuple(args.overrides), announce=False)
            d = cfg.finetune[args.dataset]
            if args.raw_root is not None:  # the user's release, never a synthetic stand-in
                d.raw_root, d.synthetic = str(args.raw_root), False
            if not d.synthetic:
                raw = locate_release(args.dataset, Path(d.raw_root), skip=Path(d.root))
                problems = check_raw(args.dataset, raw)
                if problems and args.data_command == "check":
                    for problem in problems:
                        print(problem)
                    print(
                        f"==> {raw}: {len(problems)} problem(s) in the raw release", file=sys.stderr
                    )
                    return 1
                if problems:  # the line a benchmark's pre-flight prints, before any writing
                    check_before_conversion(args.dataset, raw, Path(d.root))
                if not (raw / "annotations").is_dir() and not _complete(d.root):
                    check_writable(Path(d.root), f"finetune.{args.dataset}.root", "another root")
        announce_profile(args.profile)
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
    from benchmark.config import ConfigError, TrackingConfig
    from benchmark.report import build_report

    if not args.delta > 0:
        raise ConfigError(
            f"--delta {args.delta}: the difference the 'seeds needed' figures are for must be > 0"
        )
    tracking = TrackingConfig()
    check_writable(args.out, "--out", "another --out folder")
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
    from benchmark.ui import DEFAULT_HOST, experiment_id, port_in_use, server_command, ui_url

    if args.port is None:
        raw = os.environ.get(PORT_ENV) or "5000"
        if not raw.isdigit():
            raise ConfigError(f"{PORT_ENV}={raw!r} is not a TCP port: set it to 1-65535")
        args.port = int(raw)
    if not 0 < args.port < 65536:
        raise ConfigError(f"PORT={args.port} is not a TCP port (1-65535)")
    if port_in_use(args.port):
        raise ConfigError(
            f"port {args.port} on {DEFAULT_HOST} is in use (a UI already running?); "
            f"open http://{DEFAULT_HOST}:{args.port} or pick another with PORT=…"
        )
    cmd = server_command(args.port, artifact_root=TrackingConfig.artifact_root)
    url = ui_url(args.port, experiment_id(cmd[5], TrackingConfig.experiment))
    print(f"==> MLflow UI: {url} (store {cmd[5]}); Ctrl-C stops it", file=sys.stderr)
    from benchmark.ui import launch

    return launch(cmd)


#: The stop signals besides Ctrl-C that end a command as Ctrl-C does: a plain ``kill``
#: (systemd, docker stop, a batch scheduler) and a closed terminal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does: the run_status guards end
    the runs KILLED and the command exits 130 with its "interrupted" line (killed outright,
    its MLflow runs stayed RUNNING until a re-run). An ignored signal stays ignored
    (``nohup`` keeps SIGHUP off). Only the first one raises, so the clean-up it starts (runs
    ended KILLED) is not cut short by a second KeyboardInterrupt; a second signal kills at
    once (the default), so a clean-up that hangs can still be stopped. The handlers in place
    before are put back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for s in STOP_SIGNALS:
            if s in previous:
                signal.signal(s, signal.SIG_DFL)
        # A signal to the whole group (``kill -- -PGID``, systemd) also ends the DataLoader
        # workers (PyTorch's own SIGTERM handler there), and PyTorch's SIGCHLD handler would
        # then raise "worker killed by signal" into the clean-up below, ending the runs
        # FAILED with a traceback. Their end is this stop's, not a failure. (CPython runs
        # pending handlers by signal number, so this one comes before that SIGCHLD's.)
        previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        raise KeyboardInterrupt

    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: set outside Python, nothing to restore
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; SIGTERM and SIGHUP end it as Ctrl-C does (runs KILLED, exit 130)."""
    with _stop_signals_interrupt():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after an option that follows the first positional: argparse's gap
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
