"""`rlhf infra up | status | down`: the team stack of infra/docker-compose.yml without Docker,
for one machine: PostgreSQL (Debian's server), an S3 emulator (moto's server) for MLflow's
artifacts, the MLflow server on PostgreSQL, the Prefect server on PostgreSQL, and a Prefect
worker on a `process` work pool. Real servers on 127.0.0.1, each a detached process group
that outlives the command; `<folder>/stack.json` records what `up` started (pid, port, URL,
log) so `status` can check it and `down` can stop exactly that.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_core.app.local_postgres import (
    LocalStackError,
    cluster_is_ready,
    database_uri,
    start_cluster,
    stop_cluster,
)
from rlhf_core.app.processes import WITHOUT_JOB_RUNNER, group_is_alive, wait_for_group_exit

STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.env"
MLFLOW_ADMIN = "admin"
START_TIMEOUT_S = 120.0
ARTIFACT_BUCKET = "mlflow-artifacts"
# moto accepts any credentials; these only have to be present for boto3.
EMULATOR_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "rlhf-local",
    "AWS_SECRET_ACCESS_KEY": "rlhf-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
INFRA_EXTRA = "pip install 'rlhf-pipeline[infra]'"


@dataclass(frozen=True)
class StackPorts:
    """The loopback ports of the stack's servers."""

    postgres: int = 5432
    s3: int = 9000
    mlflow: int = 5000
    prefect: int = 4200


@dataclass(frozen=True)
class Service:
    """One running server: its process group (0 for PostgreSQL, run by pg_ctl), port, URL."""

    name: str
    pid: int
    port: int
    url: str
    log: str


def client_environment(ports: StackPorts) -> dict[str, str]:
    """What a client exports to use the stack (printed by `up` and `status`)."""
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports.mlflow}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports.prefect}/api",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
        **EMULATOR_CREDENTIALS,
    }


# --------------------------------------------------------------------------------------------
# State


def read_state(folder: Path) -> dict[str, Any]:
    """The stack's record ({"ports": {...}, "services": {name: Service fields}}), or empty."""
    path = folder / STATE_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _record(folder: Path, ports: StackPorts, service: Service) -> None:
    state = read_state(folder) or {"ports": asdict(ports), "services": {}}
    state["services"][service.name] = asdict(service)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Processes and health


def _start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A detached process group (it outlives this command), output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def http_ok(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a GET of `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(
    name: str, process: subprocess.Popen, healthy: Callable[[], bool], log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalStackError(
                f"{name} exited with code {process.returncode} while starting; see {log_path}"
            )
        if healthy():
            return
        time.sleep(0.5)
    raise LocalStackError(f"{name} did not answer within {START_TIMEOUT_S:.0f} s; see {log_path}")


def _stop_group(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout_s`; return once every
    process of it has exited (`group_is_alive`: not waiting for init to collect them)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return
        if wait_for_group_exit(pid, timeout_s):
            return


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as the servers bind: connections of a stopped server in TIME_WAIT do not count
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The servers


def _python_server(
    folder: Path,
    ports: StackPorts,
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    url: str,
    health_url: str,
) -> Service:
    log_path = folder / "logs" / f"{name}.log"
    process = _start(argv, {**os.environ, **QUIET, **env}, log_path)
    service = Service(name, process.pid, port, url, str(log_path))
    _record(folder, ports, service)  # recorded before it answers: `down` can stop it
    _wait_healthy(name, process, lambda: http_ok(health_url), log_path)
    return service


def _start_s3(folder: Path, ports: StackPorts) -> Service:
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.is_file():
        raise LocalStackError(f"moto's S3 emulator (moto_server) is not installed: {INFRA_EXTRA}")
    url = f"http://127.0.0.1:{ports.s3}"
    argv = [str(moto), "-H", "127.0.0.1", "-p", str(ports.s3)]
    service = _python_server(
        folder, ports, "s3", argv, EMULATOR_CREDENTIALS, ports.s3, url, f"{url}/moto-api/"
    )
    import boto3

    boto3.client("s3", endpoint_url=url, **_boto_credentials()).create_bucket(
        Bucket=ARTIFACT_BUCKET
    )
    return service


def _boto_credentials() -> dict[str, str]:
    return {
        "region_name": EMULATOR_CREDENTIALS["AWS_DEFAULT_REGION"],
        "aws_access_key_id": EMULATOR_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": EMULATOR_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def stack_credentials(folder: Path) -> dict[str, str]:
    """The MLflow login of the stack (MLflow's basic auth, as in infra/docker-compose.yml):
    made at the first `up` with a random password, kept in `<folder>/credentials.env`
    (owner-only), never printed. Clients load it with `set -a; . <folder>/credentials.env`."""
    path = Path(folder) / CREDENTIALS_FILE
    if not path.is_file():
        login = f"MLFLOW_TRACKING_USERNAME={MLFLOW_ADMIN}\n"
        login += f"MLFLOW_TRACKING_PASSWORD={secrets.token_urlsafe(24)}\n"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(login)
    lines = path.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _server_secret(auth: Path) -> str:
    """The key that signs MLflow's sessions (CSRF): random, made once, owner-only."""
    path = auth / "server_secret_key"
    if not path.is_file():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(secrets.token_urlsafe(32))
    return path.read_text(encoding="utf-8").strip()


def _auth_config(folder: Path) -> Path:
    """MLflow's basic-auth config: its users in SQLite under the folder, the admin's name
    here and the admin's password from the environment (`stack_credentials`)."""
    auth = folder / "mlflow-auth"
    auth.mkdir(mode=0o700, exist_ok=True)
    config = auth / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{auth / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # A login is checked by PBKDF2 (~0.3 s of CPU): once a minute, not on every request
        # of a stage's metric stream (one server worker, so no other worker's cache is stale).
        "auth_cache_ttl_seconds = 60\n",
        encoding="utf-8",
    )
    return config


def _start_mlflow(folder: Path, ports: StackPorts) -> Service:
    url = f"http://127.0.0.1:{ports.mlflow}"
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"]
    argv += ["--backend-store-uri", database_uri(ports.postgres, "mlflow")]
    argv += ["--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts"]
    argv += ["--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1"]
    env = {
        **EMULATOR_CREDENTIALS,
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
        **{name: os.environ.get(name, value) for name, value in WITHOUT_JOB_RUNNER.items()},
        "MLFLOW_AUTH_CONFIG_PATH": str(config := _auth_config(folder)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack_credentials(folder)["MLFLOW_TRACKING_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _server_secret(config.parent),
    }
    return _python_server(folder, ports, "mlflow", argv, env, ports.mlflow, url, f"{url}/health")


def _start_prefect(folder: Path, ports: StackPorts, ui: bool) -> Service:
    api = f"http://127.0.0.1:{ports.prefect}/api"
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    argv += ["--port", str(ports.prefect), "--analytics-off", "--ui" if ui else "--no-ui"]
    env = {
        "PREFECT_HOME": str(folder / "prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_uri(
            ports.postgres, "prefect", "+asyncpg"
        ),
        "PREFECT_UI_API_URL": api,
        "PREFECT_API_URL": "",  # the server is the API; it must not call another one
    }
    return _python_server(folder, ports, "prefect", argv, env, ports.prefect, api, f"{api}/health")


def _start_worker(folder: Path, ports: StackPorts, pool: str, project: Path) -> Service:
    from rlhf_core.app.worker_project import PROJECT_ROOT_VARIABLE

    log_path = folder / "logs" / "worker.log"
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    argv += ["--type", "process"]
    env = {**os.environ, **QUIET, **client_environment(ports), **stack_credentials(folder)}
    env["PREFECT_HOME"] = str(folder / "prefect")
    env[PROJECT_ROOT_VARIABLE] = str(project)  # where `rlhf deploy`'s flow runs happen
    process = _start(argv, env, log_path)
    service = Service("worker", process.pid, 0, f"work pool {pool}", str(log_path))
    _record(folder, ports, service)
    _wait_healthy("worker", process, lambda: _pool_has_worker(ports, pool), log_path)
    return service


def _pool_has_worker(ports: StackPorts, pool: str) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports.prefect}/api/work_pools/{pool}/workers/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as reply:
            return any(worker.get("status") == "ONLINE" for worker in json.load(reply))
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# up | status | down


def stack_up(
    folder: Path,
    ports: StackPorts,
    pool: str = "rlhf",
    ui: bool = True,
    say: Callable[[str], None] = print,
    project: Path = Path("."),
) -> dict[str, str]:
    """Start every server not running yet, in dependency order; the client environment.

    A failure stops the stack and raises LocalStackError naming the server and its log."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    recorded = read_state(folder)
    if recorded and StackPorts(**recorded["ports"]) != ports:
        ports = StackPorts(**recorded["ports"])
        say(f"{folder} has a stack on ports {asdict(ports)}: using them")
    running = {row["service"] for row in stack_status(folder) if row["healthy"]}
    _check_ports(ports, running)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("postgres", lambda: _start_postgres(folder, ports)),
        ("s3", lambda: _start_s3(folder, ports)),
        ("mlflow", lambda: _start_mlflow(folder, ports)),
        ("prefect", lambda: _start_prefect(folder, ports, ui)),
        ("worker", lambda: _start_worker(folder, ports, pool, Path(project).resolve())),
    ]
    for name, start in steps:
        if name in running:
            say(f"{name}: already running")
            continue
        say(f"{name}: starting")
        try:
            start()
        except LocalStackError:
            stack_down(folder, say=lambda _: None)
            raise
    return client_environment(ports)


def _start_postgres(folder: Path, ports: StackPorts) -> Service:
    cluster = folder / "postgres"
    log_path = cluster / "server.log"  # in the folder the postgres OS user owns
    start_cluster(cluster, ports.postgres, ["mlflow", "prefect"], log_path)
    service = Service(
        "postgres", 0, ports.postgres, database_uri(ports.postgres, ""), str(log_path)
    )
    _record(folder, ports, service)
    return service


def _check_ports(ports: StackPorts, running: set[str]) -> None:
    for name, port in asdict(ports).items():
        if name not in running and not _port_free(port):
            flag = f"--{name}-port"
            raise LocalStackError(f"port {port} ({name}) is taken on 127.0.0.1: choose {flag}")


def stack_status(folder: Path) -> list[dict[str, Any]]:
    """One row per recorded server: service, url, pid, healthy, log."""
    state = read_state(Path(folder))
    if not state:
        return []
    ports = StackPorts(**state["ports"])
    rows = []
    for name, fields in state["services"].items():
        service = Service(**fields)
        if name == "postgres":
            healthy = cluster_is_ready(service.port)
        elif name == "worker":
            pool = service.url.split()[-1]
            healthy = group_is_alive(service.pid) and _pool_has_worker(ports, pool)
        else:
            health = {"s3": "/moto-api/", "mlflow": "/health", "prefect": "/health"}[name]
            healthy = group_is_alive(service.pid) and http_ok(f"{service.url}{health}")
        rows.append({**asdict(service), "service": name, "healthy": healthy})
    return rows


def stack_down(folder: Path, purge: bool = False, say: Callable[[str], None] = print) -> list[str]:
    """Stop what `up` recorded, last started first; with `purge`, delete the folder (data
    included). Returns the services stopped."""
    folder = Path(folder).resolve()
    state = read_state(folder)
    stopped = []
    for name, fields in reversed(list((state.get("services") or {}).items())):
        service = Service(**fields)
        if name == "postgres":
            stop_cluster(folder / "postgres")
        else:
            _stop_group(service.pid)
        stopped.append(name)
        say(f"{name}: stopped")
    if (folder / STATE_FILE).exists():
        (folder / STATE_FILE).unlink()
    if purge and folder.exists():
        shutil.rmtree(folder)
        say(f"deleted {folder}")
    return stopped
