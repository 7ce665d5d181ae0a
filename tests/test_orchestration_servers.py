"""The servers around the flows, with real processes and sockets: `rlhf ui` on a local store
and on a tracking server, the tracking store check that runs before any stage
(rlhf_core/tracking/check.py), and the Prefect server's UI on a port of its own."""

import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import servers

from rlhf_core.app import mlflow_ui, prefect_server, processes
from rlhf_core.tracking.check import (
    TrackingStoreError,
    check_store_uri,
    mask_uri,
    without_credentials,
)

RLHF = Path(sys.executable).parent / "rlhf"
FAST_S = 10.0  # the bound on any "the store is not there" error
UI_START_S = 180.0  # `mlflow ui` answers after about 8 s on an idle 2-core machine


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    return processes.free_port()


def rlhf(*args: str, env: dict, cwd: Path, timeout: float = 60) -> tuple:
    """Run the `rlhf` console script to its end: (exit status, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [str(RLHF), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def project(tmp_path) -> Path:
    """A minimal valid project: an empty params.yaml means every default."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text("")
    return root


@pytest.fixture
def local_env() -> dict:
    """The environment of a command on the project's own store (no MLFLOW_TRACKING_URI)."""
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


@pytest.fixture
def health_server():
    """A tiny HTTP server on loopback that answers GET /health with 200 OK, as MLflow's does
    (404 anywhere else). Yields its base URL."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the name http.server calls
            found = self.path == "/health"
            body = b"OK" if found else b"not found"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep test output quiet
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server():
    """A listener that accepts connections and never says a word. Yields its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept_forever():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # the listener was closed: the test is over
                return

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def browser(record: Path) -> str:
    """A `BROWSER` for `webbrowser`: a script that writes the address it is given to `record`."""
    script = record.with_suffix(".sh")
    script.write_text(f'#!/bin/sh\necho "$1" > {record}\n')
    script.chmod(0o755)
    return str(script)


def timed_check(uri: str, base: Path = Path(".")) -> tuple[str | None, float]:
    """(the TrackingStoreError's message or None, seconds the check took)."""
    started = time.monotonic()
    try:
        check_store_uri(uri, base)
    except TrackingStoreError as error:
        return str(error), time.monotonic() - started
    return None, time.monotonic() - started


# --------------------------------------------------------------------------------------------
# The tracking store check
# --------------------------------------------------------------------------------------------


def test_credentials_are_masked_in_every_kind_of_uri():
    assert mask_uri("postgresql://alice:s3cr3t@db:5432/mlflow") == (
        "postgresql://alice:***@db:5432/mlflow"
    )
    assert mask_uri("mysql+pymysql://bob@db/mlflow") == "mysql+pymysql://bob@db/mlflow"
    assert mask_uri("http://token123@mlflow.example:5000") == "http://***@mlflow.example:5000"
    assert mask_uri("https://u:p@h/x?a=1&password=zz") == "https://***@h/x?a=1&password=***"
    assert mask_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert without_credentials("https://u:p@h:8443/mlflow") == "https://h:8443/mlflow"


def test_a_server_on_a_closed_port_fails_at_once_naming_the_uri():
    uri = f"http://127.0.0.1:{closed_port()}"
    message, seconds = timed_check(uri)
    assert message is not None and uri in message and "connection refused" in message
    assert seconds < FAST_S


def test_a_server_that_accepts_and_never_answers_fails_within_the_bound(silent_server):
    uri = f"http://alice:hunter2@127.0.0.1:{silent_server}"
    message, seconds = timed_check(uri)
    assert message is not None and "no answer within" in message
    assert f"127.0.0.1:{silent_server}" in message and "hunter2" not in message
    assert seconds < FAST_S


def test_a_server_answering_health_passes_and_one_without_it_is_named(health_server):
    assert timed_check(health_server)[0] is None
    message, _ = timed_check(f"{health_server}/not-mlflow")
    assert message is not None and "HTTP 404" in message and "/not-mlflow" in message


@pytest.mark.parametrize(
    ("scheme", "driver_module"), [("postgresql", "psycopg2"), ("mysql", "MySQLdb")]
)
def test_a_database_names_its_missing_driver_or_the_refused_uri(scheme, driver_module):
    """Holds whether or not the driver is installed (the `server` extra brings psycopg2)."""
    uri = f"{scheme}://mlflow:hunter2@127.0.0.1:{closed_port()}/mlflow"
    message, seconds = timed_check(uri)
    assert message is not None and "hunter2" not in message
    if importlib.util.find_spec(driver_module) is None:
        assert f"{scheme}:// needs the {driver_module} driver" in message
        assert "pip install" in message
    else:
        assert "Cannot connect to the tracking database" in message
        assert mask_uri(uri) in message and "refused" in message.lower()
    assert seconds < FAST_S


@pytest.mark.slow
def test_a_running_postgresql_passes_and_a_missing_database_is_named():
    from servers import postgres_server  # tests/servers.py: a throwaway cluster on loopback

    with postgres_server() as server:
        message, seconds = timed_check(server.uri)
        assert message is None and seconds < FAST_S
        absent = server.uri_for("no_such_db")
        message, seconds = timed_check(absent)
    assert message is not None and absent in message and "no_such_db" in message
    assert seconds < FAST_S


def test_sqlite_needs_the_folder_of_its_database(tmp_path):
    assert timed_check(f"sqlite:///{tmp_path}/mlflow.db")[0] is None
    assert timed_check("sqlite:///mlflow.db", base=tmp_path)[0] is None  # relative to base
    message, _ = timed_check(f"sqlite:///{tmp_path}/absent/mlflow.db")
    assert message is not None and str(tmp_path / "absent") in message


@pytest.mark.parametrize("command", ["run", "retrain", "serve"])
def test_commands_fail_fast_with_one_line_when_the_tracking_server_is_down(
    command, project, local_env
):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**local_env, "MLFLOW_TRACKING_URI": uri}
    code, _, stderr, seconds = rlhf(command, "--project", str(project), env=env, cwd=project)
    assert code == 2, stderr
    (line,) = error_lines(stderr)
    assert line.startswith("error: ") and uri in line
    assert seconds < FAST_S
    assert not (project / ".prefect").exists()  # nothing started before the check


# --------------------------------------------------------------------------------------------
# rlhf ui with a tracking server: print its address, start nothing
# --------------------------------------------------------------------------------------------


def test_ui_of_a_server_prints_its_address_opens_it_and_starts_nothing(
    health_server, project, local_env, tmp_path
):
    opened = tmp_path / "opened.txt"
    port = closed_port()
    env = {**local_env, "MLFLOW_TRACKING_URI": health_server, "BROWSER": browser(opened)}
    code, stdout, stderr, seconds = rlhf(
        "ui", "--project", str(project), "--port", str(port), "--open", env=env, cwd=project
    )
    assert code == 0, stderr
    assert health_server in stdout and "Starting" not in stdout
    assert opened.read_text().strip() == health_server
    assert not mlflow_ui.port_in_use(port) and seconds < FAST_S


def test_ui_of_a_server_that_is_down_is_one_error_line(project, local_env):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**local_env, "MLFLOW_TRACKING_URI": uri}
    code, stdout, stderr, seconds = rlhf("ui", "--project", str(project), env=env, cwd=project)
    assert code == 2
    assert len(error_lines(stderr)) == 1 and uri in stderr and stdout == ""
    assert seconds < FAST_S


# --------------------------------------------------------------------------------------------
# rlhf ui on a local store: `mlflow ui`, its failures, and no orphans
# --------------------------------------------------------------------------------------------


def test_ui_on_a_port_in_use_fails_before_starting_anything(project, local_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, stdout, stderr, seconds = rlhf(
            "ui", "--project", str(project), "--port", str(port), env=local_env, cwd=project
        )
    assert code != 0
    assert error_lines(stderr) == [f"error: port {port} on 127.0.0.1 is in use; pass --port"]
    assert "Starting" not in stdout and seconds < FAST_S


@pytest.mark.slow
def test_ui_says_so_when_mlflow_ui_exits_on_its_own(project, local_env):
    (project / "mlflow.db").write_text("not a database")  # mlflow ui exits 1 on it
    code, _, stderr, _ = rlhf(
        "ui", "--project", str(project), "--port", str(closed_port()), env=local_env, cwd=project
    )
    assert code == 1
    assert "error: mlflow ui exited with status 1" in stderr


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes whose process group is `pgid`."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def wait_until_answers(url: str, command: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert command.poll() is None, "rlhf ui exited before the UI answered"
        if processes.api_is_healthy(url, timeout_s=2):
            return
        time.sleep(0.5)
    pytest.fail(f"the UI did not answer at {url} within {timeout_s:.0f} s")


def test_a_group_of_zombies_has_stopped_and_a_running_one_has_not():
    """A member that exited but was not collected yet (a zombie: here, because this process
    does not wait for it; for a detached server, because init has not got to it) has stopped:
    stopping a server does not wait for init."""
    exited = subprocess.Popen(["true"], start_new_session=True)
    running = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        while psutil.Process(exited.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        os.killpg(exited.pid, 0)  # the group still exists: its zombie holds the pid
        assert processes.live_group_members(exited.pid) == []
        assert not processes.group_is_alive(exited.pid)
        started = time.monotonic()
        assert processes.wait_for_group_exit(exited.pid, timeout_s=10)
        assert time.monotonic() - started < 1
        assert processes.live_group_members(running.pid) == [running.pid]
        assert processes.group_is_alive(running.pid)
        assert not processes.wait_for_group_exit(running.pid, timeout_s=0.3)
        processes.stop_process_group(running, timeout_s=10)
        assert running.returncode == -signal.SIGTERM
        assert not processes.group_is_alive(running.pid)
    finally:
        running.kill()
        running.wait()
        exited.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_every_stop_signal_is_recorded_first_one_wins_and_handlers_come_back(signum):
    """The three stop signals take the same path (`StopSignals`), sent to this very process;
    the whole command is run below for SIGTERM, `serve_mlflow_ui` in this process for SIGINT."""
    before = signal.getsignal(signum)
    stop = mlflow_ui.StopSignals()
    with stop.installed():
        os.kill(os.getpid(), signum)  # recorded, not raised: this test goes on
        os.kill(os.getpid(), signal.SIGTERM if signum != signal.SIGTERM else signal.SIGINT)
        assert stop.signum == signum
    assert signal.getsignal(signum) is before


@pytest.mark.slow
def test_ui_stops_mlflow_ui_and_all_its_workers_on_sigterm(project, local_env, tmp_path):
    """The whole command, once the UI answers. SIGINT (Ctrl-C) and SIGHUP take the same path
    in `serve_mlflow_ui` (`StopSignals`): tested in this process above and below."""
    signum = signal.SIGTERM
    port = closed_port()
    address = f"http://127.0.0.1:{port}"
    log, opened = tmp_path / "ui.log", tmp_path / "opened.txt"
    with open(log, "w") as output:
        command = subprocess.Popen(
            [str(RLHF), "ui", "--project", str(project), "--port", str(port), "--open"],
            cwd=project,
            env={**local_env, "BROWSER": browser(opened)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_answers(address, command, UI_START_S)
        deadline = time.monotonic() + 10  # --open: the browser gets the address once it answers
        while not (opened.exists() and opened.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opened.read_text().strip() == address
        children = psutil.Process(command.pid).children(recursive=True)
        (ui_process,) = [c for c in children if c.ppid() == command.pid]
        workers = [c for c in children if c.ppid() == ui_process.pid]
        assert workers  # uvicorn, which serves the UI: a grandchild of the command
        assert not any("mlflow.server.jobs" in " ".join(c.cmdline()) for c in children)
        command.send_signal(signum)
        assert command.wait(timeout=30) == 128 + signum, log.read_text()
    finally:
        if command.poll() is None:
            command.kill()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert group_members(ui_process.pid) == []
    assert not mlflow_ui.port_in_use(port)
    assert "MLflow UI stopped (SIGTERM)." in log.read_text()


def test_ctrl_c_while_mlflow_ui_starts_stops_its_group_and_returns_130(
    project, monkeypatch, capsys
):
    """SIGINT reaches `serve_mlflow_ui` in this process as soon as `mlflow ui` exists: the
    UI's whole process group is stopped and the status is a shell's for Ctrl-C."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)  # the project's own store
    port = closed_port()
    me = psutil.Process()
    started: list[psutil.Process] = []

    def interrupt_once_mlflow_ui_runs() -> None:
        deadline = time.monotonic() + 60
        try:
            while not started and time.monotonic() < deadline:
                for child in me.children():
                    try:
                        if "mlflow" in child.cmdline():
                            started.append(child)
                    except psutil.Error:  # a process that ended while we looked
                        continue
                time.sleep(0.02)
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, by StopSignals

    interrupter = threading.Thread(target=interrupt_once_mlflow_ui_runs, daemon=True)
    interrupter.start()
    code = mlflow_ui.serve_mlflow_ui(project, port)
    interrupter.join(timeout=10)
    assert code == 130
    (ui_process,) = started
    assert not ui_process.is_running() or ui_process.status() == psutil.STATUS_ZOMBIE
    assert group_members(ui_process.pid) == []
    assert not mlflow_ui.port_in_use(port)
    assert "MLflow UI stopped (SIGINT)." in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# rlhf serve: the Prefect UI calls the API of its own port
# --------------------------------------------------------------------------------------------


def test_a_ui_api_url_the_user_set_is_kept():
    from prefect.settings import PREFECT_UI_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_UI_API_URL: "http://prefect.example/api"}):
        assert prefect_server.ui_api_env("http://127.0.0.1:4321/api") == {}
    with temporary_settings(restore_defaults={PREFECT_UI_API_URL}):
        assert prefect_server.ui_api_env("http://127.0.0.1:4321/api") == {
            "PREFECT_UI_API_URL": "http://127.0.0.1:4321/api"
        }


@pytest.mark.slow
def test_a_started_prefect_server_tells_its_ui_its_own_api_url(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_API_URL, temporary_settings

    for name in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL"):
        monkeypatch.delenv(name, raising=False)
    servers.seed_prefect_database(tmp_path / prefect_server.PREFECT_HOME_DIR)  # no migrations
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_API_URL}),
        prefect_server.prefect_server(tmp_path) as api_url,
    ):
        assert not api_url.endswith(":4200/api")
        base = api_url.removesuffix("/api")
        with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as reply:
            settings = json.loads(reply.read())
    assert settings["api_url"] == api_url
