"""Every bad input a user can type gets one line: exit 2, ``error: <what to do>``, nothing touched.

Each case runs the real command line in-process (``benchmark.cli.main``, as a user's
``concl-bench ...``; argparse's own exits included) in a workspace holding a populated MLflow
store, an output folder with a file in it and the inputs the case needs. It asserts exit
status 2, no output on stdout, exactly one line on stderr (no profile banner or other progress
line: those come once the checks passed), that line starting with ``error: `` and holding the
case's words (what is wrong and what to do), and that every file of the workspace, the store
and the repository's ``datasets/`` is exactly as before (names, sizes, modification times; no
file or folder added).

Left out: a full disk while writing checkpoints or artifacts, and a read-only store (real
ones need a tmpfs or a read-only mount: tests/benchmark/test_store.py).
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torchvision.models import resnet18

from benchmark.cli import main
from benchmark.data.glands import write_glas_raw
from benchmark.data.synthetic import write_pretrain_set
from benchmark.transfer.detectron2 import to_detectron2

REPO = Path(__file__).resolve().parents[2]
DEMO = "demo"


@dataclass(frozen=True)
class Case:
    """argv with ``{tmp}`` (the workspace), ``{w}`` (weights) and ``{img}`` (32 images) filled
    in; ``words`` must all be in the error line; ``setup`` prepares the workspace first;
    ``env`` is set too (``{tmp}`` and ``{port}``, a closed local port, filled in);
    ``without_gpu`` cases are skipped where torch sees one."""

    name: str
    argv: tuple[str, ...]
    words: tuple[str, ...]
    setup: Callable[[Path, Path], None] | None = field(default=None, compare=False)
    env: tuple[tuple[str, str], ...] = ()
    without_gpu: bool = False


def _roots() -> tuple[str, ...]:
    """Every folder a demo run writes, inside the workspace: a case that wrongly starts work
    never touches the repository."""
    return (
        "output_root={tmp}/out",
        "data.root={tmp}/nct",
        "finetune.glas.raw_root={tmp}/glas",
        "finetune.glas.root={tmp}/pglas",
        "finetune.crag.raw_root={tmp}/crag",
        "finetune.crag.root={tmp}/pcrag",
        "probe.tissue.train_root={tmp}/ptrain",
        "probe.tissue.test_root={tmp}/ptest",
        "pretrain.device=cpu",
        "data.num_workers=0",
    )


def _pretrain(*extra: str) -> tuple[str, ...]:
    return ("pretrain", "-m", "mocov2", "--profile", DEMO, *_roots(), *extra)


def _bench(*extra: str, method: str = "random") -> tuple[str, ...]:
    return ("benchmark", "-m", method, "--profile", DEMO, *_roots(), *extra)


def _finetune(weights: str, *extra: str) -> tuple[str, ...]:
    return ("finetune", "--weights", weights, "--profile", DEMO, *_roots(), *extra)


def _prepare(*extra: str) -> tuple[str, ...]:
    return (
        "data",
        "prepare",
        "glas",
        "--profile",
        "paper",
        "finetune.glas.root={tmp}/coco",
        *extra,
    )


def _paper_bench(*extra: str) -> tuple[str, ...]:
    method = () if "-m" in extra else ("-m", "random")
    return ("benchmark", *method, "--profile", "paper", "output_root={tmp}/out",
            "finetune.glas.raw_root={tmp}/GlaS", "finetune.glas.root={tmp}/coco",
            "finetune.datasets=[glas]", "probe.probes=[]", *extra)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Workspace set-ups
# --------------------------------------------------------------------------------------------------


def _file(tmp: Path, _: Path) -> None:
    (tmp / "file.txt").write_text("not a folder\n")


def _small_set(tmp: Path, _: Path) -> None:
    write_pretrain_set(tmp / "gen", 2, 8, 0)


def _glas_copy(tmp: Path, raw: Path) -> Path:
    target = tmp / "GlaS" / "Warwick QU Dataset (Released 2016_07_08)"
    shutil.copytree(raw, target)
    return target


def _glas_release(tmp: Path, raw: Path) -> None:
    _glas_copy(tmp, raw)


def _empty_annotation(tmp: Path, raw: Path) -> None:
    target = _glas_copy(tmp, raw)
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(target / "testA_1_anno.bmp")


def _truncated_image(tmp: Path, raw: Path) -> None:
    target = _glas_copy(tmp, raw)
    data = (target / "train_2.bmp").read_bytes()
    (target / "train_2.bmp").write_bytes(data[: len(data) // 2])


def _two_releases(tmp: Path, raw: Path) -> None:
    shutil.copytree(raw, tmp / "GlaS" / "a")
    shutil.copytree(raw, tmp / "GlaS" / "b")


def _list_checkpoint(tmp: Path, _: Path) -> None:
    """A list saved where the newest epoch checkpoint of ``_pretrain()``'s run belongs."""
    from benchmark.config import load_config, pretrain_hash
    from benchmark.training.checkpoints import CheckpointManager, run_dir

    overrides = tuple(a.format(tmp=tmp) for a in _roots())
    cfg = load_config("mocov2", DEMO, overrides=overrides, announce=False)
    folder = run_dir(cfg.output_root, "mocov2", pretrain_hash(cfg))
    folder.mkdir(parents=True)
    torch.save({"epoch": 1}, CheckpointManager(folder, "epoch").path(1))
    torch.save([1, 2, 3], CheckpointManager(folder, "epoch").path(2))


def _read_back(where: str, content: bytes | None = None, state: object = None) -> Callable:
    """A set-up that leaves, as an earlier run would, ``content`` (or ``torch.save`` of
    ``state``) at ``where`` below the folders ``_bench()``'s benchmark reads back:
    ``probe/<dataset>/<probe>/seed<k>/…`` or ``finetune/<dataset>/seed<k>/…``."""

    def setup(tmp: Path, _: Path) -> None:
        from benchmark.config import load_config
        from benchmark.pipeline import probe_dir, transfer_dir

        overrides = tuple(a.format(tmp=tmp) for a in _roots())
        cfg = load_config("random", DEMO, overrides=overrides, announce=False)
        stage, _, rest = where.partition("/")
        folder = probe_dir if stage == "probe" else transfer_dir
        path = folder(cfg, None, False) / rest
        path.parent.mkdir(parents=True)
        if content is not None:
            path.write_bytes(content)
        else:
            torch.save(state, path)

    return setup


def _bad_yaml(tmp: Path, _: Path) -> None:
    (tmp / "bad.yaml").write_text("pretrain: [unclosed\n")


def _other_key_yaml(tmp: Path, _: Path) -> None:
    (tmp / "mine.yaml").write_text("pretrain:\n  batchsize: 8\n")


ONE_LINE = "a torchvision ResNet state_dict"  # the accepted-formats clause of weight errors

CASES = [
    # ---- pre-training batch and synthetic counts (issue 13 item 7)
    Case("batch larger than the synthetic set", _pretrain("pretrain.batch_size=4096"),
         ("pretrain.batch_size=4096 is larger than", "data.synthetic_images=1024",
          "lower pretrain.batch_size to at most 1024")),
    Case("batch larger than a real image folder",
         _pretrain("data.root={img}", "data.synthetic=false", "data.list_file=null",
                   "pretrain.batch_size=64", "pretrain.bn_batch_size=32"),
         ("pretrain.batch_size=64 is larger than the 32 pre-training images",
          "lower pretrain.batch_size to at most 32")),
    Case("zero synthetic images", _pretrain("data.synthetic_images=0"),
         ("data.synthetic_images must be >= 1 (got 0)",)),
    Case("negative synthetic images", _pretrain("data.synthetic_images=-4"),
         ("data.synthetic_images must be >= 1 (got -4)",)),
    Case("generate zero images", ("data", "generate", "--root", "{tmp}/gen", "--num-images", "0"),
         ("--num-images 0: the set needs at least 1 image",)),
    Case("generate negative images",
         ("data", "generate", "--root", "{tmp}/gen", "--num-images", "-3"),
         ("--num-images -3",)),
    Case("generate zero-pixel patches",
         ("data", "generate", "--root", "{tmp}/gen", "--num-images", "2", "--size", "0"),
         ("--size 0: patches must be at least 8 px",)),
    Case("generate over another set",
         ("data", "generate", "--root", "{tmp}/gen", "--num-images", "3", "--size", "8"),
         ("holds a synthetic set made with num_images=2", "rm -rf", "choose another root"),
         _small_set),
    Case("synthetic GlaS without training images", _bench("finetune.glas.synthetic_train=0"),
         ("finetune.glas.synthetic_train must be >= 1 (got 0)",)),
    Case("fine-tuning batch larger than the synthetic GlaS", _bench("finetune.batch_size=32"),
         ("finetune.batch_size=32 is larger than the 24 training images",
          "lower finetune.batch_size to at most 24")),
    # ---- output root and other folders the run writes
    Case("output_root on a read-only file system", _pretrain("output_root=/sys/concl-bench"),
         ("output_root /sys/concl-bench is not writable", "choose a writable output_root=")),
    Case("output_root that cannot be created", _pretrain("output_root=/proc/no/such"),
         ("output_root /proc/no/such is not writable", "choose a writable output_root=")),
    Case("output_root under a file", _pretrain("output_root={tmp}/file.txt/out"),
         ("lies under", "file.txt, which is a file", "choose a writable output_root="), _file),
    Case("output_root is a file", _bench("output_root={tmp}/file.txt"),
         ("output_root", "file.txt is a file, not a folder"), _file),
    Case("synthetic data root not writable", _pretrain("data.root=/sys/concl-bench-data"),
         ("data.root /sys/concl-bench-data is not writable", "choose a writable data.root=")),
    Case("conversion root not writable", _bench("finetune.crag.root=/sys/concl-bench-crag"),
         ("finetune.crag.root /sys/concl-bench-crag is not writable",)),
    Case("report into a file", ("report", "--out", "{tmp}/file.txt/reports"),
         ("--out", "file.txt, which is a file", "choose another --out folder"), _file),
    Case("export next to a file", ("export", "{w}/good.pth", "{tmp}/file.txt/out.pkl"),
         ("the target folder", "choose another target path"), _file),
    # ---- weights files
    Case("weights that do not exist", _finetune("{tmp}/absent.pth"),
         ("absent.pth does not exist: give the path of", ONE_LINE)),
    Case("weights that are a folder", _finetune("{w}/folder.pth"),
         ("folder.pth is a folder, not a weights file", ONE_LINE)),
    Case("weights that are not a checkpoint", _finetune("{w}/junk.pth"),
         ("junk.pth: not a readable PyTorch file", ONE_LINE)),
    Case("a training checkpoint as weights", _finetune("{w}/training.pth"),
         ("training checkpoint rather than weights", ONE_LINE)),
    Case("weights without layer4", _finetune("{w}/partial.pth"),
         ("missing keys (layer4.0.conv1.weight", ONE_LINE)),
    Case("detectron2 pickle with an object array", _finetune("{w}/objects.pkl"),
         ("stem.conv1.weight is an array of object, not numbers",
          "not a detectron2 or torchvision state dict of numeric arrays", ONE_LINE)),
    Case("import of a pickle with an object array", ("import", "{w}/objects.pkl", "{tmp}/o.pth"),
         ("is an array of object",)),
    Case("export of a file that is not weights", ("export", "{w}/junk.pth", "{tmp}/out.pkl"),
         ("not a readable PyTorch file",)),
    # ---- options, shorthands and config keys
    Case("EPOCHS=0", _pretrain("--epochs", "0"),
         ("pretrain.epochs must be >= 1 (got 0; EPOCHS= / --epochs sets it)",)),
    Case("negative EPOCHS", _pretrain("--epochs", "-2"), ("(got -2;",)),
    Case("SEEDS=0", _bench("--seeds", "0"),
         ("finetune.seeds must be >= 1 (got 0; SEEDS= / --seeds sets it)",)),
    Case("SEEDS not a number", _bench("--seeds", "many"),
         ("argument --seeds: invalid int value: 'many'", "--help` lists the options")),
    Case("SEEDS empty", ("benchmark", "-m", "random", "--seeds"),
         ("argument --seeds: expected one argument",)),
    Case("GPUS=0", _pretrain("--gpus", "0"), ("--gpus / GPUS must be >= 1 (got 0)",)),
    Case("unknown method", ("pretrain", "-m", "mocov9", "--profile", DEMO),
         ("unknown method 'mocov9'; registered methods: byol",)),
    Case("unknown command", ("pretrian",), ("invalid choice: 'pretrian'",)),
    Case("unknown profile", ("pretrain", "-m", "mocov2", "--profile", "fast"),
         ("unknown profile 'fast'; use one of: auto",)),
    Case("misspelt key", _pretrain("pretrain.epoch=3"),
         ("unknown config key 'pretrain.epoch'; did you mean 'pretrain.epochs'?",)),
    Case("wrong type", _pretrain("pretrain.epochs=three"),
         ("wrong type for config key 'pretrain.epochs'",)),
    Case("a section given a value", _pretrain("pretrain=3"),
         ("'pretrain' is a config section, not a value", "pretrain.epochs=...")),
    Case("not key=value", _pretrain("epochs"), ("override 'epochs' is not of the form key=value",)),
    Case("negative learning rate", _pretrain("optim.lr=-0.1"),
         ("optim.lr must be > 0 (got -0.1)",)),
    Case("unknown optimizer", _pretrain("optim.name=adam"),
         ("optim.name 'adam' is not supported",)),
    Case("BN groups that do not split the batch", _pretrain("pretrain.bn_batch_size=7"),
         ("is not a multiple of pretrain.bn_batch_size=7",)),
    Case("negative loader workers", _pretrain("data.num_workers=-1"),
         ("data.num_workers must be >= 0 (got -1)",)),
    Case("unknown dataset", _bench("finetune.datasets=[kumar]"),
         ("finetune.datasets must name glas and/or crag",)),
    Case("unknown probe", _bench("probe.probes=[svm]"), ("probe.probes must name knn",)),
    Case("method.name disagreeing", _pretrain("method.name=byol"),
         ("choose the method with METHOD=",)),
    Case("config file that does not exist", _pretrain("--config", "{tmp}/absent.yaml"),
         ("config file", "absent.yaml does not exist")),
    Case("config file that is not YAML", _pretrain("--config", "{tmp}/bad.yaml"),
         ("bad.yaml: not valid YAML",), _bad_yaml),
    Case("config file with a misspelt key", _pretrain("--config", "{tmp}/mine.yaml"),
         ("mine.yaml: unknown config key 'pretrain.batchsize'",), _other_key_yaml),
    Case("negative seed", _pretrain("pretrain.seed=-1"), ("pretrain.seed must be >= 0 (got -1)",)),
    Case("negative generator seed",
         ("data", "generate", "--root", "{tmp}/gen", "--num-images", "2", "--seed", "-1"),
         ("--seed -1: the generator takes seeds >= 0",)),
    Case("config file that is a folder", _pretrain("--config", "{tmp}/out"),
         ("config file", "out is a folder: name a YAML file in it")),
    Case("report with a zero delta", ("report", "--delta", "0"), ("--delta 0.0", "must be > 0")),
    Case("UI port out of range", ("ui", "--port", "70000"), ("PORT=70000 is not a TCP port",)),
    Case("UI port variable not a number", ("ui",), ("CONCL_BENCH_PORT='http'", "set it to 1-65535"),
         env=(("CONCL_BENCH_PORT", "http"),)),
    Case("unknown registered backbone",
         _finetune("models:/nope-r18-ep1/1"),
         ("models:/nope-r18-ep1/1 is not a registered model version", "Models page")),
    Case("registered backbone without a version",
         _finetune("models:/nope-r18-ep1"),
         ("names no version", "models:/nope-r18-ep1/<version>")),
    # ---- device, checkpoints and the tracking store (found before any run is touched)
    Case("pretrain.device=cuda without a GPU", _pretrain("pretrain.device=cuda"),
         ("pretrain.device=cuda but torch sees no GPU; use device=cpu or auto",),
         without_gpu=True),
    Case("benchmark on cuda without a GPU", _bench("pretrain.device=cuda", method="mocov2"),
         ("pretrain.device=cuda but torch sees no GPU",), without_gpu=True),
    Case("newest checkpoint not a dict", _pretrain(),
         ("epoch_0000002.pth holds a list, not a training checkpoint",
          "move it aside to resume from the previous one"), _list_checkpoint),
    Case("damaged probe metrics.json of an earlier run", _bench(),
         ("tissue/knn/seed1/metrics.json is damaged (cannot be read: JSONDecodeError)",
          "delete it to re-run that probe"),
         _read_back("probe/tissue/knn/seed1/metrics.json", b'{"balanced_accuracy": 0.5')),
    Case("probe metrics.json without its scores", _bench(),
         ("glas/dense/seed2/metrics.json is damaged (has no dice)",
          "delete it to re-run that probe"),
         _read_back("probe/glas/dense/seed2/metrics.json", b'{"iou": 0.5}')),
    Case("damaged fine-tune metrics.json, found before pre-training", _bench(),
         ("glas/seed1/metrics.json has no bbox_AP", "delete it to score this fine-tune again"),
         _read_back("finetune/glas/seed1/metrics.json", b"[]")),
    Case("truncated fine-tune checkpoint, found before pre-training", _bench(),
         ("crag/seed1/iter_0000004.pth cannot be read",
          "move it aside to resume from the previous one"),
         _read_back("finetune/crag/seed1/iter_0000004.pth", b"PK\x03\x04 cut short")),
    Case("pre-training checkpoint where a fine-tune's belongs", _bench(),
         ("iter_0000004.pth lacks model, optimizer, iteration: not a checkpoint of this stage",),
         _read_back("finetune/glas/seed1/iter_0000004.pth", state={"epoch": 1})),
    Case("unknown tracking scheme", _pretrain(),
         ("MLflow cannot use the tracking store 'foo://somewhere/db'",
          "set MLFLOW_TRACKING_URI (or tracking.uri) to a sqlite:///path/mlflow.db file"),
         env=(("MLFLOW_TRACKING_URI", "foo://somewhere/db"),)),
    Case("unreachable tracking server", _bench(),
         ("cannot reach the MLflow server at http://127.0.0.1:",
          "or unset MLFLOW_TRACKING_URI to use the local sqlite store"),
         env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:{port}"),)),
    Case("unreachable tracking server for a report", ("report", "--out", "{tmp}/reports"),
         ("cannot reach the MLflow server at http://127.0.0.1:",),
         env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:{port}"),)),
    Case("tracking store in a folder that cannot be made", _pretrain(),
         ("cannot create the folder /proc/no/such of the tracking store",
          "to a writable place"),
         env=(("MLFLOW_TRACKING_URI", "sqlite:////proc/no/such/mlflow.db"),)),
    Case("tracking store under a file", _finetune("{w}/good.pth"),
         ("cannot create the folder", "file.txt/sub of the tracking store"), _file,
         env=(("MLFLOW_TRACKING_URI", "sqlite:///{tmp}/file.txt/sub/mlflow.db"),)),
    Case("tracking store in a folder that is not writable", _bench(),
         ("/sys/mlflow.db.lock", "make /sys writable or set MLFLOW_TRACKING_URI"),
         env=(("MLFLOW_TRACKING_URI", "sqlite:////sys/mlflow.db"),)),
    # ---- the data front door (issue 13 item 8)
    Case("GlaS raw root that does not exist", _prepare("--raw-root", "{tmp}/absent"),
         ("absent does not exist: install the dataset there or set finetune.glas.raw_root=",)),
    Case("GlaS missing before any pre-training",
         ("benchmark", "-m", "random", "--profile", "paper", "output_root={tmp}/out",
          "finetune.glas.raw_root={tmp}/absent", "probe.probes=[]"),
         ("glas data root", "absent does not exist", "--raw-root PATH")),
    Case("two GlaS releases under the data root", _prepare("--raw-root", "{tmp}/GlaS"),
         ("holds 2 glas folders", "keep one, or choose one with finetune.glas.raw_root="),
         _two_releases),
    Case("GlaS annotation without gland", _prepare("--raw-root", "{tmp}/GlaS"),
         ("testA_1_anno.bmp: no gland instance (all pixels are 0)", "fix the raw glas folder"),
         _empty_annotation),
    Case("truncated GlaS image", _prepare("--raw-root", "{tmp}/GlaS"),
         ("train_2.bmp: unreadable image (", "image file is truncated", "fix the raw glas folder"),
         _truncated_image),
    Case("GlaS annotation without gland, found before pre-training",
         _paper_bench("-m", "mocov2", "data.root={img}", "data.synthetic=false",
                      "data.list_file=null", "pretrain.batch_size=32", "pretrain.bn_batch_size=32"),
         ("testA_1_anno.bmp: no gland instance (all pixels are 0)", "fix the raw glas folder"),
         _empty_annotation),
    Case("fine-tuning batch larger than a real GlaS", _paper_bench(),
         ("finetune.batch_size=16 is larger than the 2 glas training images",
          "lower finetune.batch_size to at most 2"), _glas_release),
    Case("check of a folder that does not exist", ("data", "check", "{tmp}/absent"),
         ("absent does not exist: give glas, crag or the path of a prepared COCO folder",)),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Fixtures and the test
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store that already holds a finished run: a bad input must not add to it."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("concl-bench"))
    client.log_metric(run.info.run_id, "loss", 1.0)
    client.set_terminated(run.info.run_id)
    return root, uri


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    state = resnet18(weights=None).state_dict()
    torch.save(state, root / "good.pth")
    torch.save({k: v for k, v in state.items() if "layer4" not in k}, root / "partial.pth")
    torch.save({"model": state, "optimizer": {}, "epoch": 3}, root / "training.pth")
    (root / "junk.pth").write_bytes(b"these are not weights\n" * 4)
    (root / "folder.pth").mkdir()
    model = to_detectron2(state) | {"stem.conv1.weight": np.array([1, "a", None])}
    with open(root / "objects.pkl", "wb") as fh:
        pickle.dump({"model": model}, fh)
    return root


@pytest.fixture(scope="module")
def glas_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glas_raw(tmp_path_factory.mktemp("raw") / "GlaS", 2, 1, 0, 96, 128, seed=0)


def _closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _snapshot(*roots: Path) -> dict[str, tuple[str, int, int] | str]:
    """Every file (size, modification time and, below 1 MB, a content digest: the store, the
    workspace's files; not the 45 MB weights) and folder under ``roots``."""
    seen: dict[str, tuple[str, int, int] | str] = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            if path.is_dir():
                seen[str(path)] = "folder"
            elif path.is_file():
                st = path.stat()
                small = st.st_size < 1 << 20
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if small else "-"
                seen[str(path)] = (digest, st.st_size, st.st_mtime_ns)
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_is_one_line_and_touches_nothing(
    case: Case,
    tmp_path: Path,
    store: tuple[Path, str],
    weights: Path,
    glas_raw: Path,
    image_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_root, uri = store
    if case.without_gpu and torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key, value in case.env:
        monkeypatch.setenv(key, value.format(tmp=tmp_path, port=_closed_port()))
    monkeypatch.delenv("CONCL_BENCH_PROFILE", raising=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("written before\n")
    if case.setup is not None:
        case.setup(tmp_path, glas_raw)
    argv = [a.format(tmp=tmp_path, w=weights, img=image_folder) for a in case.argv]
    watched = (tmp_path, store_root, weights, glas_raw, image_folder)
    before = _snapshot(*watched)
    datasets_before = sorted(p.name for p in (REPO / "datasets").iterdir())
    capsys.readouterr()

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's exits
        code = exc.code

    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert out == ""
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    missing = [w for w in case.words if w not in lines[0]]
    assert not missing, f"{missing} not in {lines[0]!r}"
    assert _snapshot(*watched) == before
    assert sorted(p.name for p in (REPO / "datasets").iterdir()) == datasets_before
