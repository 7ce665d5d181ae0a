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

import psutil

# For `mlflow server` and `mlflow ui`, unless the user sets the variable. MLflow's job runner
# serves GenAI jobs only (scorers, evaluation, prompt optimisation), which the pipeline never
# submits: 8 more Python processes that slow a small machine while the server starts, and
# idle ones take ~10 s to stop.
WITHOUT_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
    """Whether every process of `process`'s group ended within `timeout_s`; the leader, our
    child, is reaped (its returncode set) once it has."""
    ended = wait_for_group_exit(process.pid, timeout_s)
    process.poll()
    return ended


def live_group_members(pgid: int) -> list[int]:
    """The pids of the processes of group `pgid` that have not exited.

    A zombie has exited: it holds no port, memory or open file, only its exit status for its
    parent to collect. A detached server's processes are orphans whose parent is init (or a
    container's first process), which may collect them seconds later; counting zombies would
    make stopping a server wait for init instead of for the server."""
    members = []
    for candidate in psutil.process_iter():
        try:
            if os.getpgid(candidate.pid) == pgid and candidate.status() != psutil.STATUS_ZOMBIE:
                members.append(candidate.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):  # it ended while we looked
            continue
    return members


def group_is_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)  # signal 0 only asks whether the group exists: cheap
    except (ProcessLookupError, PermissionError):
        return False
    return bool(live_group_members(pgid))


def wait_for_group_exit(pgid: int, timeout_s: float) -> bool:
    """Whether every process of group `pgid` exited within `timeout_s` (`group_is_alive`)."""
    deadline = time.monotonic() + timeout_s
    while group_is_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
