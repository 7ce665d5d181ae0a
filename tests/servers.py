"""Real servers on loopback for tests: PostgreSQL, the Prefect server and the MLflow server.

Plain Python (no pytest), so a test module, a fixture or a script can use them alike:
`from servers import postgres_server, prefect_server, mlflow_server` (tests/ is on the path).
Each is a context manager that starts the real program on 127.0.0.1 on a free port, waits a
bounded time until it answers, and stops it (its whole process group) afterwards. A server that
dies or never answers raises with the tail of its log, so the failure says why.

PostgreSQL comes from Debian's `postgresql` package (installed by
infra/scripts/install-test-packages.sh, which `make test` runs). A missing binary is an error,
never a skip: tests that need a server fail with a message naming that script.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

INSTALL_SCRIPT = "infra/scripts/install-test-packages.sh"

# Telemetry off for every server and client these helpers start (the machine has no internet;
# each of these would otherwise try, and log a failure, at start).
SERVER_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # As `rlhf infra up` and `rlhf ui` run MLflow: no GenAI job runner (8 processes that
    # tracking never uses, and that crowd a 2-core machine while a server starts).
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}

SERVER_START_TIMEOUT_S = 90.0


# ---------------------------------------------------------------------------------------------
# Small shared pieces


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages ('' when there is none)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5
) -> None:
    """Poll `predicate` until it returns true; raise TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def http_ok(url: str) -> bool:
    """True when a GET of `url` answers 200 (connection errors and other statuses are False)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with SERVER_DEFAULTS, plus `extra`."""
    env = {**os.environ, **SERVER_DEFAULTS}
    env.update(extra or {})
    return env


def start_process(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen:
    """Start `argv` in its own process group (so all its children stop together), output to
    `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process_group(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process's whole group, then SIGKILL it when it has not exited in timeout_s.

    Servers spawn workers (uvicorn, gunicorn, Prefect's services); killing only the parent would
    leave them holding the port and the database."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # the leader is gone; reap stray children
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    _kill_group(process.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to a process group; a group that no longer exists is already stopped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_for_http(
    url: str, process: subprocess.Popen, log_path: Path, name: str, timeout_s: float
) -> None:
    """Wait until `url` answers 200 while `process` is alive; raise with the log's tail when the
    process exits or the wait runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} before answering {url}; "
                f"log {log_path}:\n{log_tail(log_path)}"
            )
        if http_ok(url):
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"{name} did not answer {url} within {timeout_s:.0f} s; log {log_path}:\n"
        f"{log_tail(log_path)}"
    )


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path:
    """Debian's PostgreSQL server binaries (/usr/lib/postgresql/<major>/bin, newest major).

    `initdb` and `pg_ctl` are not on PATH on Debian; only this versioned folder has them."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            f"install Debian's postgresql package, e.g. run {INSTALL_SCRIPT} as root"
        )
    newest = max(candidates, key=lambda path: int(Path(path).parent.parent.name))
    return Path(newest).parent


def _as_postgres_user(argv: list[str]) -> list[str]:
    """`argv` run as the `postgres` OS user when we are root (initdb and pg_ctl refuse root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def _run(argv: list[str], what: str, timeout_s: float = 60.0) -> None:
    """Run a setup command; raise RuntimeError with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n"
            f"{result.stdout}{result.stderr}"
        )


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster: superuser `postgres`, trust auth on 127.0.0.1."""

    port: int
    bin_dir: Path
    database: str
    host: str = "127.0.0.1"
    user: str = "postgres"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the database created at start (`postgresql://` = psycopg2)."""
        return self.uri_for(self.database)

    def uri_for(self, database: str) -> str:
        """SQLAlchemy URI of `database` on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name` (one per test keeps tests apart) and return its URI."""
        createdb = str(self.bin_dir / "createdb")
        argv = [createdb, "-h", self.host, "-p", str(self.port), "-U", self.user, name]
        _run(argv, f"creating PostgreSQL database {name!r}")
        return self.uri_for(name)


def _cluster_dir(parent: Path | None) -> Path:
    """A fresh folder for the cluster, owned by the user the server runs as.

    As root the default parent is the system temp folder: the `postgres` user cannot enter
    root's private (0700) pytest folders."""
    folder = Path(tempfile.mkdtemp(prefix="rlhf-pg-", dir=parent))
    if os.geteuid() == 0:
        shutil.chown(folder, user="postgres", group="postgres")
    return folder


@contextlib.contextmanager
def postgres_server(
    parent: Path | None = None, database: str = "test", timeout_s: float = 60.0
) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL cluster on 127.0.0.1 and create `database`; stop it (fast
    shutdown) and delete its folder afterwards.

    The cluster lives in a new folder under `parent` (default: the system temp folder), with
    its unix socket inside that folder so it never touches /var/run/postgresql. fsync is off:
    the data is disposable and this keeps start and migrations quick."""
    bin_dir = postgres_bin_dir()
    folder = _cluster_dir(parent)
    data, log_path = folder / "data", folder / "server.log"
    port = free_port()
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    initdb += ["--encoding=UTF8", "--locale=C", "--no-sync"]
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log_path)]
    started = False
    try:
        _run(_as_postgres_user(initdb), "initdb")
        start = [*pg_ctl, "-o", options, "-w", "-t", str(int(timeout_s)), "start"]
        try:
            _run(_as_postgres_user(start), "pg_ctl start", timeout_s + 10)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\nserver log:\n{log_tail(log_path)}") from error
        started = True
        server = PostgresServer(port=port, bin_dir=bin_dir, database=database)
        server.create_database(database)
        yield server
    finally:
        if started:
            stop = [*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"]
            _run(_as_postgres_user(stop), "pg_ctl stop")
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Prefect server


def prefect_database_url(url: str) -> str:
    """The URL Prefect's server needs: it talks to PostgreSQL only through asyncpg, so a plain
    `postgresql://` (or `postgresql+psycopg2://`) URI is rewritten to `postgresql+asyncpg://`."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    return url


def prefect_server_env(
    home: Path, port: int, database_url: str | None, env_extra: dict[str, str] | None
) -> dict[str, str]:
    """Environment of a test Prefect server: its own PREFECT_HOME (SQLite in it by default),
    a 2 s scheduler loop, telemetry off, and no PREFECT_API_URL inherited from the caller."""
    env = server_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        }
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    if database_url is not None:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_database_url(database_url)
    env.update(env_extra or {})
    return env


PREFECT_DB_FILE = "prefect.db"  # where a Prefect server keeps SQLite under its PREFECT_HOME


def _prefect_template_dir() -> Path:
    """Where the migrated template database lives: one per Prefect version and user, shared by
    the test workers of a run (and kept for the next run on this machine)."""
    from importlib.metadata import version

    user_dir = Path(tempfile.gettempdir()) / f"rlhf-tests-{os.getuid()}"
    return user_dir / f"prefect-{version('prefect')}"


def seed_prefect_database(home: Path) -> Path:
    """Put a migrated copy of Prefect's SQLite database in `home` and return its path.

    A fresh server spends about 9 of its 21 s start on the schema migrations, and the suite starts
    several. The migrations run once (`prefect server database upgrade`, under a file lock shared
    by the xdist workers) into a template; each server gets its own copy and starts on it as on
    any database migrated by an earlier start. A `home` that already holds a database keeps it.
    """
    from filelock import FileLock

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    target = home / PREFECT_DB_FILE
    if target.exists():
        return target
    template_dir = _prefect_template_dir()
    template_dir.mkdir(parents=True, exist_ok=True)
    template = template_dir / PREFECT_DB_FILE
    with FileLock(str(template_dir / "build.lock")):
        if not template.exists():
            build_home = Path(tempfile.mkdtemp(prefix="build-", dir=template_dir))
            env = prefect_server_env(build_home, free_port(), None, None)
            completed = subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # a failure's traceback is on stderr
                text=True,
                timeout=SERVER_START_TIMEOUT_S,
            )
            if completed.returncode != 0:
                raise RuntimeError(f"prefect server database upgrade failed:\n{completed.stdout}")
            os.replace(build_home / PREFECT_DB_FILE, template)  # whole or absent
            shutil.rmtree(build_home)
    shutil.copyfile(template, target)
    return target


@contextlib.contextmanager
def prefect_server(
    home: Path,
    database_url: str | None = None,
    env_extra: dict[str, str] | None = None,
    ui: bool = False,
    timeout_s: float = SERVER_START_TIMEOUT_S,
) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1 and yield its API URL (`http://…/api`).

    `database_url`: None for SQLite under `home`, or a PostgreSQL URI (any driver prefix; the
    database needs the pg_trgm extension, which Prefect's migrations create as superuser).
    The UI is off unless asked for (it costs start time); when on, it calls this server's API.
    With SQLite, `home` starts from a migrated copy of the schema (`seed_prefect_database`).
    Waits on /api/health, so migrations are done when this yields; log in home/server.log."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    if database_url is None:
        seed_prefect_database(home)
    port = free_port()
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--analytics-off", "--ui" if ui else "--no-ui"]
    log_path = home / "server.log"
    env = prefect_server_env(home, port, database_url, env_extra)
    process = start_process(argv, env, log_path)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{api_url}/health", process, log_path, "prefect server", timeout_s)
        yield api_url
    finally:
        stop_process_group(process)


# ---------------------------------------------------------------------------------------------
# MLflow server


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts_dir: Path,
    log_path: Path | None = None,
    timeout_s: float = SERVER_START_TIMEOUT_S,
) -> Iterator[str]:
    """Run `mlflow server` (one worker) on 127.0.0.1 with `backend_uri` as its backend store and
    `artifacts_dir` as its proxied artifact store; yield its tracking URI (`http://…`).

    Waits on /health, which answers once the backend's migrations are done."""
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else artifacts_dir.parent / "mlflow-server.log"
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    argv += ["--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", "1"]
    process = start_process(argv, server_env(), log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log_path, "mlflow server", timeout_s)
        yield url
    finally:
        stop_process_group(process)


# ---------------------------------------------------------------------------------------------
# S3 emulator

S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "rlhf-test-key",
    "AWS_SECRET_ACCESS_KEY": "rlhf-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server(
    folder: Path, bucket: str, timeout_s: float = SERVER_START_TIMEOUT_S
) -> Iterator[str]:
    """Run moto's S3 emulator (`moto_server`, in memory) on 127.0.0.1 with `bucket` created;
    yield its endpoint URL. Clients authenticate with S3_TEST_CREDENTIALS (in their env)."""
    import boto3

    folder = Path(folder)
    log_path = folder / "moto-server.log"
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    argv = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    process = start_process(argv, server_env(S3_TEST_CREDENTIALS), log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/moto-api/", process, log_path, "moto_server", timeout_s)
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name=S3_TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_process_group(process)
