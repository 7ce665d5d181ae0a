"""Child processes and ports of the command's servers: a free port, an HTTP health probe,
and stopping a server with everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def api_is_healthy(api_url: str, timeout_s: float = 5.0) -> bool:
    """Whether `<api_url>/health` answers 200 (a Prefect API, e.g. http://host:4200/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a process started with `start_new_session=True` and everything it started
    (servers fork workers), wait until the whole process group is gone, and SIGKILL whatever
    is left after `timeout_s`. Members outliving their leader are stopped too."""
    if not _signal_group(process, signal.SIGTERM):
        return
    if not _wait_for_group(process, timeout_s):
        _signal_group(process, signal.SIGKILL)
        _wait_for_group(process, timeout_s)


def _signal_group(process: subprocess.Popen, signum: int) -> bool:
    """Send `signum` to the process group led by `process`; False when the group is gone."""
    process.poll()  # reap the leader if it has exited: a zombie still counts as a member
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_for_group(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether every process of `process`'s group ended within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _signal_group(process, 0):  # signal 0 only asks whether the group exists
            return True
        time.sleep(0.1)
    return False
