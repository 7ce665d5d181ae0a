"""`rlhf ui`: the MLflow UI of the project's tracking store: `mlflow ui` on a local store
until a stop signal (its whole process group stopped after), or the address of a tracking
server, which is its own UI."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_core.app.processes import WITHOUT_JOB_RUNNER, api_is_healthy, stop_process_group
from rlhf_core.tracking.check import (
    SERVER_SCHEMES,
    UNCHECKED_SCHEMES,
    check_tracking_store,
    mask_uri,
    store_scheme,
    without_credentials,
)
from rlhf_core.tracking.experiment import tracking_uri

UI_HOST = "127.0.0.1"
UI_STARTUP_TIMEOUT_S = 180.0  # `mlflow ui` answers after about 8 s on an idle 2-core machine
UI_STOP_TIMEOUT_S = 15.0  # it stops in about 2 s (uvicorn first)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UIError(RuntimeError):
    """`rlhf ui` cannot show the UI; the message is one line, `exit_code` the command's status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While `installed`, SIGINT, SIGTERM and SIGHUP are recorded in `signum` (the first one)
    instead of ending the process, so a blocking command stops its children before it exits.
    The handlers only record: what runs when the signal arrives is never interrupted."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _record(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Record the stop signals inside the block; the previous handlers come back after it."""
        previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def open_ui(project_root: str | Path = ".", port: int = 5000, open_browser: bool = False) -> int:
    """Show the MLflow UI of the project's tracking store and return the command's exit status.

    An MLflow server (http, https) is its own UI: once it answers, print its address (and open
    it in a browser with `open_browser`) and return 0, starting nothing. A local store (sqlite,
    a database server, a file store) gets `mlflow ui` on 127.0.0.1:`port` (`serve_mlflow_ui`).
    Raises TrackingStoreError when the store cannot be reached, UIError when no UI can be shown.
    """
    root = Path(project_root).resolve()
    uri = tracking_uri(root)
    if store_scheme(uri) in UNCHECKED_SCHEMES:
        raise UIError(
            f"{mask_uri(uri)} has its own UI in its workspace; rlhf ui shows a local store or an "
            "MLflow tracking server.",
            exit_code=2,
        )
    check_tracking_store(root)
    if store_scheme(uri) in SERVER_SCHEMES:
        return show_server_ui(uri, open_browser)
    return serve_mlflow_ui(root, port, open_browser)


def experiment_runs_url(address: str, experiment_id: str | None) -> str:
    """The page to open: the experiment's runs table in the UI's model-training view (MLflow
    3.17 opens every experiment in its GenAI view unless the URL says `workflowType`),
    filtered to the pipeline runs (their stage runs nest under them); `address` alone when
    the experiment does not exist yet."""
    if experiment_id is None:
        return address
    query = urllib.parse.urlencode(
        {"workflowType": "machine_learning", "searchFilter": "tags.stage = 'pipeline'"},
        quote_via=urllib.parse.quote,
    )
    return f"{address.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def experiment_id_at(address: str, timeout_s: float = 5.0) -> str | None:
    """Id of the project's experiment (`experiment_name()`) on the MLflow server at
    `address` (REST `experiments/get-by-name`), or None when it does not exist yet."""
    from rlhf_core.tracking.experiment import experiment_name

    query = urllib.parse.urlencode({"experiment_name": experiment_name()})
    url = f"{address.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return str(json.load(reply)["experiment"]["experiment_id"])
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None  # no such experiment (404), or a server that wants credentials


def show_server_ui(uri: str, open_browser: bool = False) -> int:
    """Print the address of a tracking server's UI (the server itself, without credentials)
    and open it in a browser with `open_browser`; returns 0."""
    address = experiment_runs_url(
        without_credentials(uri), experiment_id_at(without_credentials(uri))
    )
    print(f"MLflow UI: {address} (the tracking server MLFLOW_TRACKING_URI names).", flush=True)
    if open_browser:
        webbrowser.open(address)
    return 0


def port_in_use(port: int, host: str = UI_HOST) -> bool:
    """Whether something listens on host:port: binding fails with EADDRINUSE as a server's own
    bind would (SO_REUSEADDR set, so a closed connection in TIME_WAIT does not count). Other
    bind errors (a privileged port) are left for the server to report."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def mlflow_ui_command(project_root: str | Path, port: int) -> list[str]:
    """`mlflow ui` on the project's tracking store, bound to 127.0.0.1:<port>."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri(Path(project_root)),
        "--host",
        UI_HOST,
        "--port",
        str(port),
        "--workers",
        "1",  # a local UI for one person; the default 4 workers crowd a small machine
    ]


def serve_mlflow_ui(project_root: str | Path, port: int = 5000, open_browser: bool = False) -> int:
    """Serve `mlflow ui` on the project's store until SIGINT (Ctrl-C), SIGTERM or SIGHUP, then
    stop its whole process group (uvicorn and whatever it started) and return 128 +
    the signal's number, as a shell reports a command a signal ended: 130 for Ctrl-C, 143 for
    SIGTERM, 129 for SIGHUP. Opens the UI in a browser once it answers with `open_browser`.

    Raises UIError when the port is taken (exit status 2) or when `mlflow ui` exits on its own
    (its status, or 1: it exits 0 even when it could not bind the port).
    """
    root = Path(project_root).resolve()
    if port_in_use(port):
        raise UIError(f"port {port} on {UI_HOST} is in use; pass --port", exit_code=2)
    command = mlflow_ui_command(root, port)
    address = f"http://{UI_HOST}:{port}"
    env = {
        **WITHOUT_JOB_RUNNER,
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
    print(f"Starting the MLflow UI on {mask_uri(command[5])} at {address} ...", flush=True)
    with StopSignals().installed() as stop:  # before the child exists: no window to orphan it
        process = subprocess.Popen(command, cwd=root, env=env, start_new_session=True)
        try:
            _watch_ui(process, address, stop, open_browser)
        finally:
            stop_process_group(process, UI_STOP_TIMEOUT_S)
    if stop.signum is not None:
        print(f"MLflow UI stopped ({signal.Signals(stop.signum).name}).", flush=True)
        return 128 + stop.signum
    raise _ui_failure(process.returncode, port)


def _watch_ui(
    process: subprocess.Popen, address: str, stop: StopSignals, open_browser: bool
) -> None:
    """Return once a stop signal arrived or `mlflow ui` exited; say when it is ready."""
    if not _wait_for_ui(process, address, stop):
        return
    address = experiment_runs_url(address, experiment_id_at(address))
    print(f"MLflow UI ready: {address}  (Ctrl-C stops it)", flush=True)
    if open_browser:
        webbrowser.open(address)
    while stop.signum is None and process.poll() is None:
        time.sleep(0.2)


def _wait_for_ui(process: subprocess.Popen, address: str, stop: StopSignals) -> bool:
    """Whether the UI answers at `address` before a stop signal or its exit; UIError when it
    has not answered after UI_STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + UI_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if stop.signum is not None or process.poll() is not None:
            return False
        if api_is_healthy(address, timeout_s=2.0):
            return True
        time.sleep(0.5)
    raise UIError(f"mlflow ui did not answer at {address} within {UI_STARTUP_TIMEOUT_S:.0f} s.")


def _ui_failure(returncode: int | None, port: int) -> UIError:
    """What to say when `mlflow ui` exited on its own (after its group was stopped)."""
    code = returncode or 1
    if port_in_use(port):
        return UIError(f"mlflow ui could not serve: port {port} is in use; pass --port", code)
    return UIError(
        f"mlflow ui exited with status {returncode}; its output above says why.", exit_code=code
    )
