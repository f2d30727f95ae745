"""The command line as a user meets it: one-line errors, help, and the torchrun launcher."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmark.cli import _strip_gpus, main
from tests.benchmark._procs import descendants, kill_tree, needs_proc, wait_for_tree, wait_gone

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_unknown_method_is_one_clear_line(capsys: pytest.CaptureFixture[str]):
    assert main(["pretrain", "--method", "nope", "--profile", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: unknown method 'nope'; registered methods: "
        "byol, concl, densecl, mocov1, mocov2, pcl, random, simclr, supervised"
    ]


def test_misspelt_key_is_one_clear_line(capsys: pytest.CaptureFixture[str]):
    assert main(["pretrain", "-m", "mocov2", "--profile", "demo", "pretrain.epoch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [  # no profile banner: it comes once the checks passed
        "error: command line: unknown config key 'pretrain.epoch'; did you mean 'pretrain.epochs'?"
    ]


def test_missing_data_root_says_what_to_do(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    args = ["pretrain", "-m", "mocov2", "--profile", "demo", "--epochs", "1"]
    overrides = [f"data.root={tmp_path / 'absent'}", "data.synthetic=false"]
    assert main([*args, *overrides, f"output_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "does not exist" in err and "make data" in err


def test_methods_and_help(capsys: pytest.CaptureFixture[str]):
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.startswith("byol")
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    assert "--gpus" in capsys.readouterr().out


def test_strip_gpus():
    assert _strip_gpus(["pretrain", "--gpus", "2", "-m", "x", "--gpus=4", "a=1"]) == [
        "pretrain",
        "-m",
        "x",
        "a=1",
    ]


def test_gpus_2_launches_two_gloo_processes_and_logs_one_child(tiny_overrides, tmp_path: Path):
    overrides = tiny_overrides(tmp_path / "out", "pretrain.epochs=1")
    args = ["pretrain", "-m", "mocov2", "--profile", "demo", "--gpus", "2"]
    proc = cli(*args, *overrides, env={"CI": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 processes" in proc.stderr
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")
    children = client.search_runs([exp.experiment_id], "tags.stage = 'pretrain'")
    assert len(children) == 1
    assert children[0].data.params["world_size"] == "2"
    assert children[0].info.status == "FINISHED"


def test_worker_errors_are_reduced_to_their_own_line(tmp_path: Path):
    from torch.utils.data import DataLoader

    from benchmark.cli import one_line
    from benchmark.data.pretrain import DatasetError, PretrainImageDataset

    (tmp_path / "broken.png").write_bytes(b"not a png")
    loader = DataLoader(PretrainImageDataset(tmp_path), num_workers=1, collate_fn=list)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    assert "\n" in str(info.value)  # what PyTorch hands back from the worker
    line = one_line(info.value)
    assert line.startswith("cannot read image ") and "broken.png" in line
    assert one_line(DatasetError("plain")) == "plain"


def test_export_and_import_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import torch
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    pkl, back = tmp_path / "out.pkl", tmp_path / "back.pth"
    assert main(["export", "--format", "detectron2", str(tmp_path / "backbone.pth"), str(pkl)]) == 0
    assert main(["import", str(pkl), str(back)]) == 0
    restored = torch.load(back, weights_only=True)
    assert all(torch.equal(restored[k], state[k]) for k in state if not k.startswith("fc."))
    assert main(["export", str(tmp_path / "backbone.pth"), str(tmp_path / "out.txt")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_data_check_lists_problems_by_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from benchmark.data.coco import convert_glas
    from benchmark.data.glands import write_glas_raw

    raw = write_glas_raw(tmp_path / "raw", 2, 1, 0, height=96, width=128)
    coco = convert_glas(raw, tmp_path / "coco")
    assert main(["data", "check", str(coco)]) == 0
    next((coco / "train").iterdir()).unlink()
    assert main(["data", "check", str(coco)]) == 1
    assert "train" in capsys.readouterr().out


def test_report_on_an_empty_store_is_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    assert main(["report", "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own INFO lines
    assert err.startswith("error: no finished benchmark runs") and "make benchmark" in err
    assert not (tmp_path / "reports").exists()


def test_ui_refuses_a_busy_port(capsys: pytest.CaptureFixture[str]):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_data_generate_takes_an_explicit_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["data", "generate", "--root", str(tmp_path / "g"), "--num-images", "3",
                 "--size", "8"]) == 0  # fmt: skip
    assert len((tmp_path / "g" / "train.txt").read_text().splitlines()) == 3
    assert "writing 3 synthetic H&E patches of 8 px" in capsys.readouterr().err


def test_data_prepare_uses_a_release_as_it_unzips_or_the_raw_root_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from benchmark.data.glands import write_glas_raw

    release = tmp_path / "GlaS" / "Warwick QU Dataset (Released 2016_07_08)"
    write_glas_raw(release, 2, 1, 0, height=96, width=128)
    out = tmp_path / "prepared"
    args = ["data", "prepare", "glas", "--profile", "paper", f"finetune.glas.root={out}"]
    assert main([*args, f"finetune.glas.raw_root={tmp_path / 'GlaS'}"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"==> glas: using {release} (found below {tmp_path / 'GlaS'})" in err
    assert err[-1] == f"==> glas ready for fine-tuning: {out}"
    assert main(["data", "check", "glas", "--profile", "paper", "--raw-root", str(release),
                 f"finetune.glas.root={out}"]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""


def test_data_check_lists_a_raw_releases_problems_before_converting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import numpy as np
    from PIL import Image

    from benchmark.data.glands import write_glas_raw

    raw = write_glas_raw(tmp_path / "raw", 2, 1, 0, height=96, width=128)
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(raw / "testA_1_anno.bmp")
    (raw / "train_2_anno.bmp").unlink()
    out = tmp_path / "prepared"
    args = ["--profile", "paper", "--raw-root", str(raw), f"finetune.glas.root={out}"]
    assert main(["data", "check", "glas", *args]) == 1
    listed = capsys.readouterr().out.splitlines()
    assert listed == [
        f"{raw / 'train_2.bmp'}: no annotation train_2_anno.bmp",
        f"{raw / 'testA_1_anno.bmp'}: no gland instance (all pixels are 0)",
    ]
    assert main(["data", "prepare", "glas", *args]) == 2  # prepare agrees: it refuses
    assert "train_2.bmp: no annotation" in capsys.readouterr().err
    assert not out.exists()


def test_check_writable_leaves_no_trace(tmp_path: Path):
    from benchmark.cli import check_writable
    from benchmark.config import ConfigError

    (tmp_path / "keep.txt").write_text("x")
    stamp = tmp_path.stat().st_mtime_ns
    check_writable(tmp_path, "output_root", "a writable output_root=…")
    check_writable(tmp_path / "new" / "deeper", "output_root", "a writable output_root=…")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert tmp_path.stat().st_mtime_ns == stamp  # the folder's times are put back
    with pytest.raises(ConfigError, match=r"^output_root /sys/x is not writable \(cannot"):
        check_writable(Path("/sys/x"), "output_root", "a writable output_root=…")


def test_overrides_may_follow_options_anywhere(capsys: pytest.CaptureFixture[str]):
    argv = ["pretrain", "-m", "mocov2", "pretrain.epochs=2", "--profile", "demo", "optim.lr=-1"]
    assert main(argv) == 2  # the second override is read, not refused as unrecognized
    assert capsys.readouterr().err.splitlines()[-1] == "error: optim.lr must be > 0 (got -1.0)"


def _torchrun_pretrain(tiny_overrides, out: Path, err: Path) -> subprocess.Popen[bytes]:
    """``concl-bench pretrain --gpus 2`` long enough to be stopped while it trains."""
    args = ["pretrain", "-m", "mocov2", "--profile", "demo", "--gpus", "2"]
    overrides = tiny_overrides(out, "pretrain.epochs=200")
    with open(err, "wb") as stderr:  # a file: a full pipe would block the workers
        return subprocess.Popen(
            [sys.executable, "-m", "benchmark", *args, *overrides],
            cwd=REPO,
            env={**os.environ, "CI": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own group, as a terminal's foreground job
        )


@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_a_stopped_torchrun_launch_leaves_no_process(how: str, tiny_overrides, tmp_path: Path):
    """concl-bench -> torchrun -> 2 workers (each in a session of its own). Before, a
    SIGTERM to concl-bench left all three running. SIGTERM: the workers get one SIGINT,
    end as a Ctrl-C does, and the launcher says how to continue (exit 130). ``kill -9`` of
    concl-bench: the kernel hands torchrun the SIGINT, and it stops its workers."""
    launcher = _torchrun_pretrain(tiny_overrides, tmp_path / "out", tmp_path / "err.txt")
    processes: set[int] = set()
    try:
        processes = wait_for_tree(launcher, 3, 180)  # torchrun and its two workers
        if how == "SIGTERM":  # stop it while it trains: rank 0 wrote the run's config
            deadline = time.monotonic() + 180
            while not list((tmp_path / "out").glob("mocov2-*/config.yaml")):
                assert launcher.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            processes |= descendants(launcher.pid)
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=120) == 130
            err = (tmp_path / "err.txt").read_text().strip().splitlines()
            assert err[-1].startswith("interrupted: checkpoints written so far are kept")
        else:
            launcher.kill()
            launcher.wait()
        assert wait_gone(processes, 90) == set()
    finally:
        kill_tree(launcher, processes)


_STUBBORN_TREE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
# a grandchild leading a session of its own, as torchrun's workers do, that ignores SIGINT
subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True)
time.sleep(600)
"""


@needs_proc
def test_the_supervisor_kills_a_stubborn_tree_and_its_other_sessions():
    """A tree that ignores the SIGINT it is handed is killed after the timeout, the sessions
    its descendants lead included (a signal to the command's group alone misses them)."""
    code = (
        "import signal, sys; from benchmark.ui import supervise; "
        f"r = supervise([[sys.executable, '-c', {_STUBBORN_TREE!r}]], "
        "interrupt=signal.SIGINT, timeout=1.0); "
        "sys.exit(10 + r.stopped_by if r.stopped_by else 1)"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    processes: set[int] = set()
    try:
        processes = wait_for_tree(supervisor, 2, 60)
        time.sleep(0.5)  # the grandchild's SIGINT handler is in place
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 10 + signal.SIGTERM
        assert wait_gone(processes, 10) == set()
    finally:
        kill_tree(supervisor, processes)


_STUBBORN_SERVER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("up", flush=True)
time.sleep(600)
"""


@needs_proc
def test_ctrl_c_of_the_ui_launcher_waits_for_a_stubborn_server_to_be_killed():
    """``concl-bench ui`` waits for its supervisor (``launch``): Ctrl-C reaches both, and the
    supervisor has the time to kill a server that ignores SIGTERM (``subprocess.call`` killed
    the supervisor 0.25 s after Ctrl-C, leaving such a server running)."""
    serve = (
        "import sys; from benchmark.ui import serve; "
        f"sys.exit(serve([sys.executable, '-c', {_STUBBORN_SERVER!r}], timeout=2.0))"
    )
    code = (
        "import sys; from benchmark.ui import launch; "
        f"sys.exit(launch([sys.executable, '-c', {serve!r}]))"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    processes: set[int] = set()
    try:
        assert launcher.stdout.readline().strip() == "up"
        processes = wait_for_tree(launcher, 3, 30)  # supervisor, server, its child
        os.killpg(launcher.pid, signal.SIGINT)
        assert launcher.wait(timeout=30) == 128 + signal.SIGINT
        assert wait_gone(processes, 10) == set()
    finally:
        kill_tree(launcher, processes)


def _runs(uri: str) -> dict[str, str]:
    """Status of every run in the suite's experiment, keyed by its stage tag (parent: '')."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("concl-bench")
    runs = client.search_runs([exp.experiment_id])
    return {r.data.tags.get("stage", "") + f"#{i}": r.info.status for i, r in enumerate(runs)}


@needs_proc
@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
def test_sigterm_to_a_pretraining_ends_its_runs_killed_and_a_rerun_finishes(
    group: bool, tiny_overrides, tmp_path: Path
):
    """A plain SIGTERM (or SIGHUP) to a single-process concl-bench killed it outright: its
    pre-training and parent runs stayed RUNNING until a re-run. Now it ends as Ctrl-C does:
    one "interrupted" line, exit 130, both runs KILLED, its DataLoader workers gone; the
    same command then resumes and finishes both runs. To the whole group (``kill --
    -PGID``, systemd) the workers die of it too, which PyTorch reported as a worker failure
    into the clean-up (runs FAILED, a traceback)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "-m", "benchmark", "pretrain", "-m", "mocov2", "--profile", "demo"]
    argv += tiny_overrides(tmp_path / "out", "pretrain.epochs=5", "data.num_workers=2")
    env = {**os.environ, "CI": "1", "MLFLOW_TRACKING_URI": uri}
    err = tmp_path / "err.txt"
    with open(err, "wb") as stderr:  # a file: a full pipe would block it
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=group,  # its own group, as a terminal's foreground job
        )
    processes: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "out").glob("mocov2-*/epoch_0000001.pth")):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch-1 checkpoint in 180 s"
            time.sleep(0.05)
        processes = descendants(proc.pid)
        assert len(processes) >= 2  # the two persistent loader workers
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, err.read_text()[-3000:]
        lines = err.read_text().strip().splitlines()
        assert [line for line in lines if "interrupted" in line] == [lines[-1]]
        assert lines[-1].startswith("interrupted: checkpoints written so far are kept")
        assert "Traceback" not in err.read_text()
        assert sorted(_runs(uri).values()) == ["KILLED", "KILLED"]  # parent and pre-training
        assert wait_gone(processes, 30) == set()
    finally:
        kill_tree(proc, processes)
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 5/5:" in again.stderr and "epoch 1/5:" not in again.stderr  # resumed
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert sorted(_runs(uri).values()) == ["FINISHED", "FINISHED"]


def test_stop_signals_raise_keyboard_interrupt_once_and_ignored_ones_stay_ignored():
    """SIGTERM and SIGHUP act as Ctrl-C in main(); a SIGHUP ignored (nohup) stays ignored;
    after the first signal a second one takes its default action; all is put back after."""
    from benchmark.cli import _stop_signals_interrupt

    def interrupted_by(signum: int) -> bool:
        with contextlib.suppress(KeyboardInterrupt), _stop_signals_interrupt():
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs at the next bytecode
            return False
        return True

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)}
    previous_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert not interrupted_by(signal.SIGHUP)  # as under nohup
        assert interrupted_by(signal.SIGTERM)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert interrupted_by(signal.SIGHUP)
        with pytest.raises(KeyboardInterrupt), _stop_signals_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:  # the clean-up the first signal started: a second one is the default
                assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous_hup)
    assert {s: signal.getsignal(s) for s in before} == before


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under ``root``."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    }


def test_damaged_results_and_checkpoints_read_back_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A finished tiny benchmark (probes and one fine-tune seed), then what a re-run reads
    back, damaged: a probe's metrics.json (a traceback before), the seed's metrics.json and,
    with that one gone, the fine-tune checkpoint its resume loads (found only once
    pre-training and the probes had run). Each is one line from the pre-flight, exit 2,
    before any run or file is touched: so the pre-flight's paths are the run's."""
    from tests.benchmark._tiny import TINY_FINETUNE
    from tests.benchmark.probe.test_stage import TINY_PROBE

    argv = [
        "benchmark", "-m", "random", "--profile", "demo", f"output_root={tmp_path / 'out'}",
        f"finetune.glas.raw_root={tmp_path / 'raw'}", f"finetune.glas.root={tmp_path / 'coco'}",
        f"probe.tissue.train_root={tmp_path / 'ptrain'}",
        f"probe.tissue.test_root={tmp_path / 'ptest'}", "finetune.seeds=1",
        "finetune.datasets=[glas]", *TINY_FINETUNE, *TINY_PROBE, "probe.probes=[knn,dense]",
        "probe.seeds=1",
    ]  # fmt: skip
    assert main(argv) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("concl-bench")

    def runs() -> list[tuple[str, str, int | None]]:
        found = client.search_runs([exp.experiment_id])
        return sorted((r.info.run_id, r.info.status, r.info.end_time) for r in found)

    before_runs = runs()
    assert [status for _, status, _ in before_runs] == ["FINISHED"] * 4  # parent, 2 probes, 1 seed
    (knn,) = (tmp_path / "out").rglob("probe-*/tissue/knn/seed1/metrics.json")
    (seed,) = (tmp_path / "out").rglob("finetune-*/glas/seed1/metrics.json")
    (checkpoint,) = seed.parent.glob("iter_*.pth")

    def refused(path: Path, damaged: bytes, line: str) -> None:
        good = path.read_bytes()
        path.write_bytes(damaged)
        files = _tree(tmp_path)
        capsys.readouterr()
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]
        assert path.read_bytes() == damaged and _tree(tmp_path) == files
        assert runs() == before_runs
        path.write_bytes(good)

    fix = "delete it to re-run that probe"
    refused(knn, b'{"balanced_accuracy": 1', f"{knn} is damaged (cannot be read: "
            f"JSONDecodeError): {fix}")  # fmt: skip
    refused(knn, b'{"macro_f1": 1.0}', f"{knn} is damaged (has no balanced_accuracy): {fix}")
    refused(seed, b"[]", f"{seed} has no bbox_AP: delete it to score this fine-tune again "
            "from its newest checkpoint")  # fmt: skip
    aside = seed.rename(tmp_path / "metrics.json")
    refused(checkpoint, checkpoint.read_bytes()[:1000], f"checkpoint {checkpoint} cannot be read "
            "(RuntimeError); move it aside to resume from the previous one")  # fmt: skip
    aside.rename(seed)
    assert main(argv) == 0  # all good again: a finished benchmark, nothing re-run
    assert runs() == before_runs
