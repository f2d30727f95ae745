"""The MLflow UI as users compare methods in it: ``concl-bench ui`` on a store holding two
(tiny) benchmarks, opened in Debian's Chromium (installed by ``make test``) through Selenium.

It checks the rendered page, not the API: the URL the command prints lands on the training
runs (not MLflow 3's GenAI overview), both parents are rows there with their Dataset and
Source cells filled, and the chart view of the two renders; its screenshot is saved (to
``$CONCL_BENCH_SCREENSHOTS`` as well when set, which is how docs/images/ui-chart-view.png is
made). SIGTERM then ends the server and everything it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.config import load_config
from benchmark.core.contracts import World
from benchmark.pipeline import run_benchmark
from tests.benchmark._procs import descendants, kill_tree, wait_gone
from tests.benchmark._tiny import TINY_FINETUNE

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
#: The flags a root user's headless Chromium needs on a machine with a closed network.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
TRANSFER = ("finetune.seeds=1", "finetune.datasets=[glas]", *TINY_FINETUNE)
PARENTS = ("random r18 demo", "mocov2 r18 ep2 demo")
DATASET_COL = "attributes.`Dataset`"  # the runs table's column ids (ag-grid's col-id)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_benchmarks(tmp_path: Path, tiny_overrides, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store with a random-init and a MoCo-v2 benchmark, each fine-tuned on (tiny) GlaS."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    glas = (f"finetune.glas.raw_root={tmp_path / 'raw'}", f"finetune.glas.root={tmp_path / 'coco'}")
    random_init = (*glas, f"output_root={tmp_path / 'out'}", *TRANSFER)
    run_benchmark(load_config("random", "demo", overrides=random_init, announce=False), World())
    mocov2 = (*tiny_overrides(tmp_path / "out"), *glas, *TRANSFER)
    run_benchmark(load_config("mocov2", "demo", overrides=mocov2, announce=False), World())
    return uri


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} missing: `make browser` installs Debian's chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look online
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _cells(driver, run_id: str) -> dict[str, str]:
    """The rendered text of each column of the runs table's row of ``run_id``."""
    from selenium.webdriver.common.by import By

    out: dict[str, str] = {}
    for cell in driver.find_elements(By.CSS_SELECTOR, f'[row-id="{run_id}"] [col-id]'):
        out[cell.get_attribute("col-id")] = cell.text.strip()
    return out


def _wait(predicate, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not render within {timeout:.0f} s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_ui_lands_on_runs_with_datasets_and_sources_in_a_real_browser(
    two_benchmarks: str, tmp_path: Path
):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By

    client = MlflowClient(two_benchmarks)
    exp = client.get_experiment_by_name("concl-bench")
    parents = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs([exp.experiment_id], "tags.run_kind = 'benchmark'")
    }
    assert sorted(parents) == sorted(PARENTS)

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": two_benchmarks, "CONCL_BENCH_PORT": str(port)}
    started = time.monotonic()
    ui = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "ui"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    driver = None
    try:
        line = ui.stderr.readline()
        match = re.search(r"MLflow UI: (\S+)", line)
        assert match, line
        url = match.group(1)
        assert url == (
            f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
            "/runs?workflowType=machine_learning"
        )
        _wait(lambda: _answers(port), 60, "the server")
        print(f"UI ready {time.monotonic() - started:.1f} s after start")
        assert len(descendants(ui.pid)) <= 3  # supervisor, mlflow's CLI, uvicorn: no job runner

        driver = _browser(tmp_path / "chromium")
        driver.get(url)
        ids = list(parents.values())
        _wait(
            lambda: all(_cells(driver, rid).get(DATASET_COL) for rid in ids),
            what="the runs table",
        )
        assert "/runs" in driver.current_url
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Token Usage" not in body and "Detect Issues" not in body  # not the GenAI view
        for name, run_id in parents.items():
            cells = _cells(driver, run_id)
            assert cells["attributes.`Run Name`"].splitlines()[-1] == name  # after its colour
            # the first of its datasets as "name (digest)", then "+N" for the others
            logged = client.get_run(run_id).inputs.dataset_inputs
            shown = {f"{i.dataset.name} ({i.dataset.digest})" for i in logged}
            assert cells[DATASET_COL].splitlines()[0] in shown, cells
            assert len(logged) == (2 if name.startswith("random") else 3)
            assert cells["attributes.`Source`"].startswith("concl-b"), cells  # concl-bench

        driver.get(url.replace("runs?", "runs?compareRunsMode=CHART&"))
        _wait(
            lambda: "glas_bbox_AP_mean" in driver.find_element(By.TAG_NAME, "body").text,
            what="the chart view",
        )
        shot = tmp_path / "ui-chart-view.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("CONCL_BENCH_SCREENSHOTS"):
            out = Path(os.environ["CONCL_BENCH_SCREENSHOTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / shot.name)
    finally:
        if driver is not None:
            driver.quit()
        tree = descendants(ui.pid)
        ui.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            ui.wait(timeout=30)
        alive = wait_gone(tree, 15)
        kill_tree(ui, set(tree))
    assert ui.returncode is not None and not alive, f"{alive} outlived the UI's SIGTERM"


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
