"""A PostgreSQL cluster of the project's own, from Debian's server binaries, for `rlhf infra`.

initdb and pg_ctl refuse to run as root, so as root they run as the `postgres` OS user (which
Debian's package creates), in a folder that user owns. The cluster listens on 127.0.0.1 only,
keeps its unix socket in its own folder (never /var/run/postgresql) and trusts local
connections: it is a laptop's or a test machine's database, not a team's (infra/
docker-compose.yml is that).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

POSTGRES_INSTALL = "install Debian's postgresql package (infra/scripts/install-test-packages.sh)"


class LocalStackError(RuntimeError):
    """A server of the local stack cannot start or stop; the message says which and why."""


def postgres_bin_dir() -> Path:
    """Debian's server binaries, /usr/lib/postgresql/<major>/bin of the newest major (initdb
    and pg_ctl are not on PATH on Debian)."""
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        raise LocalStackError(f"PostgreSQL's initdb was not found: {POSTGRES_INSTALL}.")
    newest = max(candidates, key=lambda path: int(Path(path).parent.parent.name))
    return Path(newest).parent


def as_server_user(argv: list[str]) -> list[str]:
    """`argv` run as the `postgres` OS user when this process is root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def run_checked(argv: list[str], what: str, timeout_s: float = 120.0) -> str:
    """Run a command; LocalStackError naming `what` with its output when it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LocalStackError(f"{what} failed: {error}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        raise LocalStackError(f"{what} failed: {output[-1] if output else done.returncode}")
    return done.stdout


def prepare_cluster_folder(folder: Path) -> None:
    """Create the cluster's folder; as root, hand it to `postgres` and check that user can
    reach it (a folder under a private home, such as /root, cannot be)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    shutil.chown(folder, user="postgres", group="postgres")
    probe = subprocess.run(as_server_user(["test", "-w", str(folder)]), check=False)
    if probe.returncode != 0:
        raise LocalStackError(
            f"the postgres OS user cannot write {folder} (a folder above it is private to "
            "root): choose a folder it can reach with `rlhf infra up --dir`"
        )


def start_cluster(folder: Path, port: int, databases: list[str], log_path: Path) -> None:
    """initdb (first time only), start on 127.0.0.1:`port`, create missing `databases`."""
    bin_dir = postgres_bin_dir()
    prepare_cluster_folder(folder)
    data = folder / "data"
    if not (data / "PG_VERSION").is_file():
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        run_checked(as_server_user([*initdb, "--encoding=UTF8", "--locale=C"]), "initdb")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log_path), "-o", options]
    start_what = f"PostgreSQL on 127.0.0.1:{port} (log {log_path})"
    run_checked(as_server_user([*start, "-w", "-t", "60", "start"]), start_what)
    existing = run_checked(
        [str(bin_dir / "psql"), *connection(port), "-Atc", "SELECT datname FROM pg_database"],
        "listing PostgreSQL databases",
    ).split()
    for name in databases:
        if name not in existing:
            run_checked([str(bin_dir / "createdb"), *connection(port), name], f"createdb {name}")


def stop_cluster(folder: Path) -> bool:
    """pg_ctl stop (fast); False when the cluster was not running."""
    data = folder / "data"
    if not (data / "postmaster.pid").is_file():
        return False
    stop = [str(postgres_bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    run_checked(as_server_user(stop), "stopping PostgreSQL")
    return True


def cluster_is_ready(port: int) -> bool:
    """Whether the cluster accepts connections on 127.0.0.1:`port` (pg_isready)."""
    try:
        ready = [str(postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
    except LocalStackError:
        return False
    return subprocess.run(ready, capture_output=True, check=False).returncode == 0


def connection(port: int) -> list[str]:
    """psql/createdb flags for the cluster as its superuser over TCP on loopback."""
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]


def database_uri(port: int, database: str, driver: str = "") -> str:
    """SQLAlchemy URI of `database` (driver "" = psycopg2 for MLflow, "+asyncpg" for Prefect)."""
    return f"postgresql{driver}://postgres@127.0.0.1:{port}/{database}"
