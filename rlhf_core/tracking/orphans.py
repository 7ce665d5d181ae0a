"""Runs left RUNNING by a process that died (SIGKILL, out of memory, power loss).

A process that is killed cannot end its MLflow run, which then shows as running forever. Each
stage and pipeline run records the process that opened it (host, pid and the process's start
time, so a reused pid is not mistaken for it). The next run of the same stage on the same host
ends every such run whose process is gone: status FAILED, tag `ended_by` saying why. Runs of
other hosts, and runs whose process is alive (a run going on beside this one), are left alone.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import psutil

log = logging.getLogger(__name__)

HOST_TAG = "process.host"
PID_TAG = "process.pid"
STARTED_TAG = "process.started"  # the process's start time (psutil create_time), seconds


def process_tags() -> dict[str, str]:
    """The tags that name this process: host, pid and start time."""
    me = psutil.Process(os.getpid())
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        STARTED_TAG: f"{me.create_time():.3f}",
    }


def process_alive(pid: int, started: float) -> bool:
    """Whether process `pid` runs and is the one that started at `started` (not a reuse)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # someone else's process with that pid: not a run of ours
        return True


def end_orphaned_runs(client: Any, experiment_id: str, stage: str) -> list[str]:
    """End (FAILED, tag `ended_by`) the RUNNING runs of `stage` this host opened whose process
    is gone; returns their ids. Each is named in a warning."""
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.stage = '{stage}' "
            f"and tags.`{HOST_TAG}` = '{host}'"
        ),
    )
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid, started = int(tags[PID_TAG]), float(tags[STARTED_TAG])
        except (KeyError, ValueError):
            continue
        if process_alive(pid, started):
            continue
        reason = f"its process ({host} pid {pid}) ended without ending the run (killed?)"
        client.set_tag(run.info.run_id, "ended_by", f"the next {stage} run: {reason}")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("marked MLflow run %s (%s) FAILED: %s", run.info.run_id, stage, reason)
        ended.append(run.info.run_id)
    return ended
