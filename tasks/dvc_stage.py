"""Prefect task: reproduce one DVC stage and report what happened.

DVC decides staleness (Prefect task caching is off): `dvc status <stage> --json` first; an
up-to-date stage is `skipped` without running DVC's repro. A stale one runs through
`dvc repro --single-item <stage>` in a subprocess whose output is streamed line by line to
the run logger; it `ran`, or DVC's run-cache `restored` its outputs without running the
command. Either way the result carries the outputs' md5 from dvc.lock (the stage's version)
and the MLflow run id from the run markers beside its outputs (for a skipped stage, the run
that produced the current outputs).

Only transient failures are retried: DVC's "Unable to acquire lock" (another DVC process holds
the repository) and OS-level hiccups starting a process. A stage that fails on its own is not.

Loaded by path from flows/ (`rlhf_core.scripts.load_script`), never installed.
Stages are those of the root dvc.yaml (foreach stages as `policy@dpo`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from rlhf_core.orchestration.warm_stages import stage_server_environment
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.tracking.runs import PARENT_RUN_ENV

log = logging.getLogger(__name__)

# The message DVC prints when another DVC process holds the repository lock (dvc/lock.py).
DVC_LOCK_MESSAGE = "Unable to acquire lock"
# OS errors that say "try again later", as opposed to a missing program or a bad path.
TRANSIENT_OS_ERRORS = (BlockingIOError, ChildProcessError, InterruptedError, TimeoutError)
TAIL_LINES = 40  # lines of a failed stage's output kept for its error message
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAYS = [10, 60]  # seconds before the first and the second retry

RAN, SKIPPED, RESTORED = "ran", "skipped", "restored"


class DvcCommandError(RuntimeError):
    """A DVC command (or the stage it ran) exited non-zero; `transient` when a retry may help."""

    def __init__(self, args: Iterable[str], returncode: int, output_tail: list[str]) -> None:
        self.dvc_args = list(args)
        self.command = "dvc " + " ".join(self.dvc_args)
        self.returncode = returncode
        self.output_tail = output_tail
        self.transient = any(DVC_LOCK_MESSAGE in line for line in output_tail)
        super().__init__(
            f"`{self.command}` failed with exit code {returncode}: {_gist(output_tail)}"
        )

    def __reduce__(self) -> tuple:
        # Prefect may pickle a failed task's exception; rebuild it from its own arguments.
        return type(self), (self.dvc_args, self.returncode, self.output_tail)


def _gist(output: list[str]) -> str:
    """DVC's last ERROR line, and the stage's own last line before it (its exception)."""
    lines = [line.strip() for line in output if line.strip()]
    if not lines:
        return "no output"
    errors = [line for line in lines if line.startswith("ERROR")]
    own = [line for line in lines if not line.startswith(("ERROR", "WARNING"))]
    if not errors:
        return lines[-1]
    return f"{errors[-1]} (last output: {own[-1]})" if own else errors[-1]


# --------------------------------------------------------------------------------------------
# DVC as a subprocess
# --------------------------------------------------------------------------------------------


def dvc_command(*args: str) -> list[str]:
    """`python -m dvc ...` with this interpreter, so the project's own DVC always runs."""
    return [sys.executable, "-m", "dvc", *args]


def stage_environment(parent_run_id: str | None) -> dict[str, str]:
    """The environment of a stage process.

    The interpreter's bin folder goes first on PATH (stage commands call `rlhf` and
    `python`, which must be the project's even when its venv is not activated), output is
    unbuffered so it streams, MLFLOW_PARENT_RUN_ID is the pipeline's run (or unset), and
    RLHF_STAGE_SERVER names the flow's warm stage server when one is active.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(stage_server_environment())  # a warm stage server, when the flow runs one
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    else:
        env.pop(PARENT_RUN_ENV, None)
    return env


def _run_dvc(project_root: Path, *args: str) -> str:
    """stdout of a quick DVC command; a non-zero exit raises DvcCommandError."""
    done = subprocess.run(
        dvc_command(*args), cwd=project_root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).splitlines()
        raise DvcCommandError(args, done.returncode, lines[-TAIL_LINES:])
    return done.stdout


# --------------------------------------------------------------------------------------------
# Stage order
# --------------------------------------------------------------------------------------------


def parse_dot(dot: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(nodes, edges) of `dvc dag --dot` output; an edge (a, b) means b depends on a."""
    nodes: list[str] = []
    edges: list[tuple[str, str]] = []
    for line in dot.splitlines():
        edge = re.fullmatch(r'\s*"(.+)"\s*->\s*"(.+)"\s*;?\s*', line)
        if edge:
            edges.append((edge.group(1), edge.group(2)))
            continue
        node = re.fullmatch(r'\s*"(.+)"\s*;?\s*', line)
        if node:
            nodes.append(node.group(1))
    return nodes, edges


def topological_order(
    nodes: Iterable[str], edges: Iterable[tuple[str, str]], rank: Mapping[str, int]
) -> list[str]:
    """Kahn's algorithm: every node after all its dependencies; among the nodes that are
    ready at once, the lowest `rank` first (then by name). A cycle is a ValueError."""
    nodes = list(dict.fromkeys(nodes))
    waiting_on = {node: 0 for node in nodes}
    dependents: dict[str, list[str]] = {node: [] for node in nodes}
    for upstream, downstream in edges:
        if upstream in waiting_on and downstream in waiting_on:
            waiting_on[downstream] += 1
            dependents[upstream].append(downstream)

    def order_key(node: str) -> tuple[int, str]:
        return rank.get(node, len(rank)), node

    ready = sorted((n for n, count in waiting_on.items() if count == 0), key=order_key)
    ordered: list[str] = []
    while ready:
        node = ready.pop(0)
        ordered.append(node)
        for downstream in dependents[node]:
            waiting_on[downstream] -= 1
            if waiting_on[downstream] == 0:
                ready.append(downstream)
        ready.sort(key=order_key)
    if len(ordered) != len(nodes):
        stuck = sorted(set(nodes) - set(ordered))
        raise ValueError(f"The DVC pipeline has a cycle through stages {stuck}.")
    return ordered


def dvc_yaml_rank(project_root: Path) -> dict[str, int]:
    """Position of each top-level stage in dvc.yaml (`policy` for `policy@dpo` too)."""
    dvc_yaml = Path(project_root) / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise ValueError(f"No dvc.yaml in {project_root}: run from the project root.")
    stages = (read_yaml(dvc_yaml) or {}).get("stages") or {}
    return {name: position for position, name in enumerate(stages)}


def read_yaml(path: Path) -> Any:
    """A YAML file parsed with libyaml when PyYAML has it (dvc.lock of a real pipeline takes
    0.1 s per read in pure Python, and the flow reads it once per stage)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def stage_order(project_root: str | Path) -> list[str]:
    """The stages of the DVC DAG (`dvc dag --dot`) in an order that runs each after its
    dependencies, ties in dvc.yaml order; `.dvc` files (tracked data) are not stages."""
    root = Path(project_root)
    nodes, edges = parse_dot(_run_dvc(root, "dag", "--dot"))
    stages = [node for node in nodes if not node.endswith(".dvc")]
    by_stage = dvc_yaml_rank(root)
    rank = {stage: by_stage.get(stage.split("@")[0], len(by_stage)) for stage in stages}
    return topological_order(stages, edges, rank)


# --------------------------------------------------------------------------------------------
# What DVC knows about one stage
# --------------------------------------------------------------------------------------------


def stale_reasons(project_root: str | Path, stage: str) -> list[str]:
    """Why DVC would rerun `stage` (`dvc status <stage> --json`); empty when up to date.

    Each reason reads like "changed deps: data/preferences (modified)".
    """
    status = json.loads(_run_dvc(Path(project_root), "status", stage, "--json") or "{}")
    return _reasons(status.get(stage, []))


def stale_stages(project_root: str | Path) -> dict[str, list[str]]:
    """Every stale stage with its reasons, from ONE `dvc status --json` (no targets).

    Stages missing from the result are up to date; entries of `.dvc` files are left out.
    """
    status = json.loads(_run_dvc(Path(project_root), "status", "--json") or "{}")
    return {
        name: _reasons(entries)
        for name, entries in status.items()
        if not name.endswith(".dvc") and entries
    }


def _reasons(entries: Iterable[Any]) -> list[str]:
    reasons = []
    for entry in entries:
        if isinstance(entry, str):  # e.g. "changed command", "always changed"
            reasons.append(entry)
            continue
        for kind, changes in entry.items():
            if isinstance(changes, Mapping):
                listed = ", ".join(f"{path} ({change})" for path, change in changes.items())
            else:
                listed = str(changes)
            reasons.append(f"{kind}: {listed}")
    return reasons


def locked_outputs(project_root: str | Path, stage: str) -> dict[str, str]:
    """{out path: md5} of `stage` in dvc.lock (empty when the stage never ran)."""
    lock_file = Path(project_root) / "dvc.lock"
    if not lock_file.is_file():
        return {}
    locked = (read_yaml(lock_file) or {}).get("stages") or {}
    outs = (locked.get(stage) or {}).get("outs") or []
    # `hash` names the algorithm ("md5"); the value is under that name (etag for cloud outs).
    return {out["path"]: out.get("md5") or out.get("etag") or "" for out in outs}


def producer_run_id(project_root: str | Path, outputs: Iterable[str]) -> str | None:
    """The MLflow run that produced the first output directory whose run marker (beside it,
    `tracking.lineage.read_producer_run_id`) still matches its content."""
    for path in outputs:
        full = Path(project_root) / path
        if full.is_dir():
            run_id = read_producer_run_id(full)
            if run_id is not None:
                return run_id
    return None


def repro_outcome(stage: str, output: Iterable[str]) -> str | None:
    """From `dvc repro` output: RAN, RESTORED (run-cache), SKIPPED, or None if not said."""
    for line in output:
        if f"Stage '{stage}' is cached - skipping run" in line:
            return RESTORED
        if f"Stage '{stage}' didn't change, skipping" in line:
            return SKIPPED
        if f"Running stage '{stage}'" in line:
            return RAN
    return None


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


def is_transient(error: BaseException) -> bool:
    """Whether a retry may succeed: DVC's repository lock was taken, or the OS said "later"
    (EAGAIN, EINTR, a timeout). A missing program or file and a failing stage are not."""
    if isinstance(error, DvcCommandError):
        return error.transient
    return isinstance(error, TRANSIENT_OS_ERRORS)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run of the task only when transient."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called as a plain function (tests, `.fn`)
        return log


def _stream_repro(root: Path, stage: str, env: dict[str, str], logger: Any) -> list[str]:
    """Run `dvc repro --single-item <stage>`, log each line as it comes; return the output."""
    output: deque[str] = deque(maxlen=TAIL_LINES)
    seen: list[str] = []
    args = ("repro", "--single-item", stage)
    process = subprocess.Popen(
        dvc_command(*args),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    try:
        assert process.stdout is not None
        for raw_line in process.stdout:
            line = raw_line.rstrip("\n")
            output.append(line)
            if "Stage '" in line or "Running stage '" in line:
                seen.append(line)
            if line.strip():
                logger.info("[%s] %s", stage, line)
        returncode = process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave the stage running
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if returncode != 0:
        raise DvcCommandError(args, returncode, list(output))
    return seen


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=DEFAULT_RETRIES,
    retry_delay_seconds=DEFAULT_RETRY_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def run_stage(
    stage: str,
    project_root: str = ".",
    parent_run_id: str | None = None,
    reasons: list[str] | None = None,
) -> dict[str, Any]:
    """Reproduce one DVC stage if it is stale and report it.

    `reasons` is what the caller already knows (from `stale_stages`): [] = up to date, so no
    DVC process at all; a non-empty list = reproduce (DVC still skips the stage if nothing
    it depends on changed); None = ask `dvc status` first.

    Returns {"stage", "status": "ran" | "skipped" | "restored", "reasons" (why it was stale),
    "duration_s", "outputs": {path: md5 from dvc.lock}, "run_id" (MLflow run that produced
    the outputs, or None)}. Raises DvcCommandError when DVC or the stage fails.
    """
    root = Path(project_root).resolve()
    logger = _logger()
    started = time.perf_counter()
    if reasons is None:
        reasons = stale_reasons(root, stage)
    if not reasons:
        status = SKIPPED
        logger.info("%s: up to date, skipped", stage)
    else:
        logger.info("%s: stale (%s), reproducing", stage, "; ".join(reasons))
        env = stage_environment(parent_run_id)
        status = repro_outcome(stage, _stream_repro(root, stage, env, logger)) or RAN
    outputs = locked_outputs(root, stage)
    result = {
        "stage": stage,
        "status": status,
        "reasons": reasons,
        "duration_s": round(time.perf_counter() - started, 2),
        "outputs": outputs,
        "run_id": producer_run_id(root, outputs),
    }
    logger.info("%s: %s in %.1f s (run %s)", stage, status, result["duration_s"], result["run_id"])
    return result
