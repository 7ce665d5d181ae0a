"""A Prefect API for schedules and event triggers: the one PREFECT_API_URL names, or a
`prefect server start` of the project's own on a free loopback port."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_core.app.processes import api_is_healthy, free_port, stop_process_group

log = logging.getLogger(__name__)


PREFECT_HOME_DIR = ".prefect"  # git-ignored, inside the project
SERVER_STARTUP_TIMEOUT_S = 180.0
# Prefect's ephemeral server gets 20 s to start by default; a busy 2-core machine needs more.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def prefect_defaults(project_root: str | Path) -> dict[str, str]:
    """Environment defaults for Prefect in a project: PREFECT_HOME in `<root>/.prefect`,
    telemetry off, a startup timeout the ephemeral server can meet on a small machine."""
    return {
        "PREFECT_HOME": str(Path(project_root).resolve() / PREFECT_HOME_DIR),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": EPHEMERAL_STARTUP_TIMEOUT_S,
    }


def configure_prefect(project_root: str | Path) -> None:
    """Apply `prefect_defaults` to os.environ where the user has not set them.

    Prefect reads its settings when first imported, so call this before importing it.
    """
    for key, value in prefect_defaults(project_root).items():
        os.environ.setdefault(key, value)


def wait_for_api(
    api_url: str, process: subprocess.Popen | None, timeout_s: float = SERVER_STARTUP_TIMEOUT_S
) -> None:
    """Poll the API's health until it answers; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api_is_healthy(api_url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"The Prefect server exited with code {process.returncode} before it was "
                "ready; see .prefect/server.log."
            )
        time.sleep(1.0)
    raise RuntimeError(f"The Prefect server at {api_url} was not ready after {timeout_s:.0f} s.")


@contextmanager
def prefect_server(project_root: str | Path) -> Iterator[str]:
    """A Prefect API to use: PREFECT_API_URL when set, in the environment or the Prefect
    profile (it must answer), else a server started here (`prefect server start` on
    127.0.0.1, a free port, PREFECT_HOME in the project, log in .prefect/server.log) and
    stopped on exit. Its UI calls that port's API (`ui_api_env`). Yields the API URL."""
    from prefect.settings import PREFECT_API_URL

    root = Path(project_root).resolve()
    configured = PREFECT_API_URL.value()
    if configured:
        if not api_is_healthy(configured):
            raise ValueError(f"PREFECT_API_URL={configured} does not answer; start that server.")
        print(f"Using the Prefect server at {configured}.", flush=True)
        yield configured
        return
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **prefect_defaults(root), **ui_api_env(api_url)}
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    print(f"Starting a Prefect server on 127.0.0.1:{port} (home {home}) ...", flush=True)
    command = [sys.executable, "-m", "prefect", "server", "start"]
    with open(home / "server.log", "ab") as server_log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process_group ends it all
        )
    try:
        wait_for_api(api_url, process)
        print(f"Prefect server ready: UI at http://127.0.0.1:{port}", flush=True)
        yield api_url
    finally:
        stop_process_group(process)


def ui_api_env(api_url: str) -> dict[str, str]:
    """`PREFECT_UI_API_URL=<api_url>` for a server started here, unless the user set it: on
    any port but 4200 the UI would otherwise call http://127.0.0.1:4200/api."""
    from prefect.settings import get_current_settings

    if "api_url" in get_current_settings().server.ui.model_fields_set:
        return {}
    return {"PREFECT_UI_API_URL": api_url}
