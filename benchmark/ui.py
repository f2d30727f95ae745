"""``make ui``: the MLflow UI on this machine, serving the project's tracking store.

The server binds 127.0.0.1 only (runs can hold paths and configs that are nobody else's
business); reach it from another machine through an SSH tunnel. The command is built here,
not in the Makefile, so that the test starts exactly what users start.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmark.tracking import DEFAULT_ARTIFACT_ROOT, artifact_root_for, tracking_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def server_command(
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    uri: str | None = None,
    artifact_root: str = DEFAULT_ARTIFACT_ROOT,
) -> list[str]:
    """``mlflow server`` over the project's store (``MLFLOW_TRACKING_URI`` wins)."""
    store = tracking_uri(uri)
    artifact_root = artifact_root_for(store, artifact_root) or DEFAULT_ARTIFACT_ROOT
    if "://" not in artifact_root:
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--default-artifact-root",
        artifact_root,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def port_in_use(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether something already listens on ``host:port`` (a UI started earlier, say)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
