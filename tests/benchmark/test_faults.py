"""kill -9 of a real pre-training and a real benchmark, then the same command again.

Each test runs one command as a subprocess several times, each time killed with SIGKILL at
a later named point (``_fault_run``: inside checkpoint writes, mid-epoch, mid-window, after
a result was written but before its run ended), then once more as plain
``python -m benchmark`` to the end. What must then hold, against one uninterrupted run of
the same config in its own store (``reference``): the backbone bit for bit with loader
workers on, the same fine-tune and probe results and printed table, in MLflow one parent and
one child per stage, all FINISHED, one entry per (metric, step) with the uninterrupted run's
values, the same files in the output folder (no ``.tmp``, pruned checkpoints), and no loader
worker of a killed process left running. Two processes on one fresh store:
``test_store.py::test_two_processes_start_on_one_fresh_store_three_times``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.benchmark._tiny import TINY_FINETUNE, TINY_TISSUE_PROBE

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "concl-bench"
#: Overridden below: one tissue probe, and fine-tune checkpoints (3) off the log windows (2),
#: so that a kill can fall after a logged window and before the checkpoint that covers it.
_OWN = ("probe.probes=", "finetune.checkpoint_every=")
OVERRIDES = (
    *(o for o in TINY_FINETUNE if not o.startswith(_OWN)),
    "finetune.checkpoint_every=3",
    "finetune.seeds=1",
    "finetune.datasets=[glas]",
    "data.list_file=null",
    "data.synthetic=false",
    "data.image_size=32",
    "data.num_workers=2",  # the demo default: resume must be exact with workers
    "pretrain.batch_size=8",  # 32 images: 4 steps an epoch
    "pretrain.bn_batch_size=4",
    "pretrain.epochs=2",
    "pretrain.device=cpu",
    "pretrain.channels_last=false",
    "method.queue_size=64",
    "probe.probes=[knn]",
    "probe.seeds=1",
    *TINY_TISSUE_PROBE,
)
#: Metrics that measure time, not training: they differ between any two runs.
_TIMED = ("time", "per_sec")


@dataclass
class Store:
    """One command's output folder and MLflow store, and the processes killed in it."""

    root: Path
    shared: Path
    command: str
    killed: list[int] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def args(self) -> list[str]:
        s = self.shared
        return [
            self.command,
            "-m",
            "mocov2",
            "--profile",
            "demo",
            *OVERRIDES,
            f"data.root={s / 'images'}",
            f"finetune.glas.raw_root={s / 'glas-raw'}",
            f"finetune.glas.root={s / 'glas-coco'}",
            f"probe.tissue.train_root={s / 'tissue' / 'train'}",
            f"probe.tissue.test_root={s / 'tissue' / 'test'}",
            f"output_root={self.out}",
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "OMP_NUM_THREADS": "1", "CI": "1"}

    def kill_at(self, point: str) -> None:
        """Run the command until it SIGKILLs itself at ``point``; fail if it never got there."""
        mark = self.root / f"killed-{len(self.killed)}"
        self.root.mkdir(parents=True, exist_ok=True)
        log = mark.with_suffix(".log")
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.benchmark._fault_run", point, str(mark)]
                + self.args(),
                cwd=REPO,
                env=self.env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its loader workers share the session: found later
            )
            self.killed.append(proc.pid)
            rc = proc.wait(timeout=300)
        tail = log.read_text()[-3000:]
        assert rc == -signal.SIGKILL, f"{point}: exit {rc}, not a kill\n{tail}"
        assert mark.read_text() == point, tail

    def finish(self) -> str:
        """The same command again, plain ``python -m benchmark``, to the end; its stderr."""
        proc = subprocess.run(
            [sys.executable, "-m", "benchmark", *self.args()],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def runs(self) -> dict[tuple[str, ...], dict]:
        """Every run of the store by what it is (parent, stage and tags), each with its
        status, artifacts and full metric histories; asserts each is there once."""
        client = self.client()
        exp = client.get_experiment_by_name(EXPERIMENT)
        found = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
        keys = [_run_key(r) for r in found]
        assert [k for k, n in Counter(keys).items() if n > 1] == [], "a stage has two runs"
        out = {}
        for key, run in zip(keys, found, strict=True):
            histories = {
                m: [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, m)]
                for m in run.data.metrics
            }
            out[key] = {
                "status": run.info.status,
                "lifecycle": run.info.lifecycle_stage,
                "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
                "artifact_dir": Path(run.info.artifact_uri.removeprefix("file://")),
                "metrics": histories,
                "tags": run.data.tags,
            }
        return out

    def run_dir(self) -> Path:
        (directory,) = self.out.glob("mocov2-*")
        return directory

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.out).as_posix() for p in self.out.rglob("*"))

    def child(self, stage: str) -> dict:
        (run,) = [r for k, r in self.runs().items() if k[0] == stage]
        return run


def _run_key(run) -> tuple[str, ...]:
    tags = run.data.tags
    if tags.get("run_kind") == "benchmark":
        return ("parent",)
    return (tags["stage"], *(tags.get(t, "") for t in ("dataset", "probe", "seed")))


def _steps_once(runs: dict[tuple[str, ...], dict]) -> None:
    for key, run in runs.items():
        for metric, history in run["metrics"].items():
            steps = [step for step, _ in history]
            assert len(steps) == len(set(steps)), f"{key} {metric}: {history}"


def _timeless(history: dict[str, list]) -> dict[str, list]:
    """Histories sorted by step, without the metrics that time the run."""
    return {k: sorted(v) for k, v in history.items() if not any(t in k for t in _TIMED)}


def _equal_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _table(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("|", "(COCO AP"))]


def _left_running(sessions: list[int], seconds: float = 30.0) -> list[int]:
    """Live processes of the killed commands' sessions (loader workers notice their parent's
    death within about 5 s), after waiting up to ``seconds`` for them to go."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                in_session = os.getsid(int(entry.name)) in sessions
                zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if in_session and not zombie:
                alive.append(int(entry.name))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _end_sessions(store: Store) -> None:
    """Clean-up after a failure: only the sessions this test started, only while alive."""
    for sid in store.killed:
        if _left_running([sid], 0):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGKILL)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input data every run of the module reads (pre-training images, GlaS, tissue sets)."""
    root = tmp_path_factory.mktemp("fault-data")
    rng = np.random.default_rng(0)
    for i in range(32):
        sub = root / "images" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:03d}.png")
    return root


@dataclass
class Reference:
    store: Store
    stderr: str
    runs: dict[tuple[str, ...], dict]


@pytest.fixture(scope="module")
def reference(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted benchmark of the config every test kills."""
    store = Store(tmp_path_factory.mktemp("reference"), shared, "benchmark")
    stderr = store.finish()
    runs = store.runs()
    assert {r["status"] for r in runs.values()} == {"FINISHED"}
    _steps_once(runs)
    return Reference(store, stderr, runs)


def test_a_pretraining_killed_inside_its_writes_resumes_exactly(
    reference: Reference, shared: Path, tmp_path: Path
):
    """``pretrain`` killed inside the epoch-2 checkpoint write after the epoch was logged (a
    second ``loss`` entry before the tracker's step check; the re-run resumes at epoch 1 with
    its workers, where the runs split before the fix), then right after ``done.json`` (its
    runs stayed RUNNING for good while done.json was written before they ended). The
    benchmark test below kills a pre-training mid-epoch."""
    store = Store(tmp_path, shared, "pretrain")
    try:
        store.kill_at("write:epoch_0000002.pth")  # epoch 2 logged, its checkpoint not
        run_dir = store.run_dir()
        assert [p.name for p in run_dir.glob("epoch_*.pth")] == ["epoch_0000001.pth"]
        assert list(run_dir.glob(".epoch_0000002.pth.*.tmp"))
        assert [s for s, _ in store.child("pretrain")["metrics"]["loss"]] == [1, 2]

        store.kill_at("wrote:done.json")  # the re-run will find it finished: touch nothing
        assert (run_dir / "done.json").is_file()
        assert {r["status"] for r in store.runs().values()} == {"FINISHED"}

        store.finish()
        assert _left_running(store.killed) == []
    finally:
        _end_sessions(store)

    ref_dir = reference.store.run_dir()
    assert run_dir.name == ref_dir.name  # the same pre-training config
    _equal_state(run_dir / "backbone.pth", ref_dir / "backbone.pth")
    assert _sha(run_dir / "backbone.pth") == _sha(ref_dir / "backbone.pth")
    done = json.loads((run_dir / "done.json").read_text())
    assert done["backbone_sha256"] == _sha(run_dir / "backbone.pth")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        p.name for p in ref_dir.iterdir() if p.is_file()
    )
    assert list(tmp_path.rglob("*.tmp")) == []

    runs = store.runs()
    assert sorted(runs) == [("parent",), ("pretrain", "", "", "")]
    assert {k: r["status"] for k, r in runs.items()} == dict.fromkeys(runs, "FINISHED")
    _steps_once(runs)
    child, ref_child = runs[("pretrain", "", "", "")], reference.runs[("pretrain", "", "", "")]
    assert _timeless(child["metrics"]) == _timeless(ref_child["metrics"])
    assert child["artifacts"] == ref_child["artifacts"]
    assert _sha(child["artifact_dir"] / "backbone.pth") == _sha(run_dir / "backbone.pth")


def test_a_benchmark_killed_in_every_stage_prints_the_uninterrupted_table(
    reference: Reference, shared: Path, tmp_path: Path
):
    """``benchmark`` killed in its pre-training's epoch 2, inside the probe's ``metrics.json``
    write (its ``.tmp`` stayed), inside a fine-tune checkpoint write after a logged window,
    mid-window after a checkpoint (the resumed window must log the uninterrupted mean), and
    between the seed's ``metrics.json`` and the end of its run (its checkpoints stayed
    unpruned): the same table, results, runs and files as never interrupted."""
    store = Store(tmp_path, shared, "benchmark")
    seed = "finetune-*/glas/seed1"
    try:
        store.kill_at("pretrain_step:6")  # in epoch 2 of the pre-training, workers running
        run_dir = store.run_dir()
        assert [p.name for p in run_dir.glob("epoch_*.pth")] == ["epoch_0000001.pth"]

        store.kill_at("write:tissue/knn/seed1/metrics.json")  # the probe, scored
        (probe,) = run_dir.glob("probe-*/tissue/knn/seed1")
        assert list(probe.glob(".metrics.json.*.tmp")) and (probe / "per_image.json").is_file()

        store.kill_at("write:glas/seed1/iter_0000003.pth")  # iteration 2 logged, not saved
        (seed_dir,) = run_dir.glob(seed)
        assert list(seed_dir.glob(".iter_0000003.pth.*.tmp"))
        history = store.child("finetune")["metrics"]["train_loss"]
        assert [s for s, _ in history] == [2]

        store.kill_at("finetune_iter:3")  # checkpoint 3 holds half of the window 3-4
        assert [p.name for p in seed_dir.glob("iter_*.pth")] == ["iter_0000003.pth"]

        store.kill_at("wrote:glas/seed1/metrics.json")  # scored on disk, its run not ended
        assert sorted(p.name for p in seed_dir.glob("iter_*.pth")) == [
            "iter_0000003.pth",
            "iter_0000004.pth",
        ]
        assert store.child("finetune")["status"] == "RUNNING"

        stderr = store.finish()
        assert _left_running(store.killed) == []
    finally:
        _end_sessions(store)

    assert _table(stderr) == _table(reference.stderr) != []
    ref_dir = reference.store.run_dir()
    _equal_state(run_dir / "backbone.pth", ref_dir / "backbone.pth")
    (ref_seed,) = ref_dir.glob(seed)
    (ref_probe,) = ref_dir.glob("probe-*/tissue/knn/seed1")
    for mine, theirs in ((seed_dir, ref_seed), (probe, ref_probe)):
        got, want = (json.loads((d / "metrics.json").read_text()) for d in (mine, theirs))
        assert _timeless({k: [v] for k, v in got.items()}) == _timeless(
            {k: [v] for k, v in want.items()}
        )
    assert (probe / "per_image.json").read_text() == (ref_probe / "per_image.json").read_text()
    assert list(tmp_path.rglob("*.tmp")) == []
    assert store.files() == reference.store.files()  # pruned as the reference, nothing left

    runs = store.runs()
    assert sorted(runs) == sorted(reference.runs)  # one parent, one child per stage
    assert {k: r["status"] for k, r in runs.items()} == dict.fromkeys(runs, "FINISHED")
    _steps_once(runs)
    for key, run in runs.items():
        assert _timeless(run["metrics"]) == _timeless(reference.runs[key]["metrics"]), key
        assert run["artifacts"] == reference.runs[key]["artifacts"], key
