"""Where a stage process's time goes: start-up, tracking, and the stage's own compute.

`rlhf stage X` runs in its own process (DVC starts it). Its wall time splits into

    startup_s    process start -> the stage function starts (interpreter, imports, params)
    import_s     inside the stage function, time in `import` statements that load modules
                 (the heavy libraries are imported lazily, where first needed)
    tracking_s   inside the stage function, time in MLflow calls (`tracking.runs.stage_run` and
                 every `StageRun` method: runs, params, artifacts, model copies, the final
                 flush); per-step metrics are sent by a background thread while the stage
                 computes (`tracking.metric_writer`), so only the final flush's wait counts
    compute_s    the rest of the stage function: reading data, training, generating,
                 evaluating, writing outputs - the work the stage exists to do

Time is claimed by the outermost category: an import inside an MLflow call is tracking time.
Import time is measured by wrapping `builtins.__import__` while the stage function runs.

and `record_stage_timing` writes them to `artifacts/timings/<stage>.json` (git-ignored, not a
DVC output, so timing noise never changes a stage's outputs). The benchmarks read these to
split a pipeline run's wall time into compute and orchestration overhead.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_seconds = {"tracking": 0.0, "import": 0.0}
_active: list[str] = []  # categories entered, outermost first


@contextmanager
def _claimed(category: str) -> Iterator[None]:
    """Count the enclosed time under `category` unless an outer claim already counts it."""
    _active.append(category)
    started = time.perf_counter()
    try:
        yield
    finally:
        _active.pop()
        if not _active:
            _seconds[category] += time.perf_counter() - started


def tracking_time():
    """Context manager: the enclosed time is tracking time (nested claims count once)."""
    return _claimed("tracking")


def counts_as_tracking(function: F) -> F:
    """Decorator: the function's time is tracking time."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with tracking_time():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def tracking_seconds() -> float:
    """Tracking time so far in this process."""
    return _seconds["tracking"]


def import_seconds() -> float:
    """Import time counted so far (only while `counting_imports` is active)."""
    return _seconds["import"]


@contextmanager
def counting_imports() -> Iterator[None]:
    """Count time spent in `import` statements that are not already satisfied by sys.modules."""
    import builtins
    import sys

    original = builtins.__import__

    def timed_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in sys.modules and not fromlist:
            return original(name, globals, locals, fromlist, level)
        with _claimed("import"):
            return original(name, globals, locals, fromlist, level)

    builtins.__import__ = timed_import
    try:
        yield
    finally:
        builtins.__import__ = original


def process_age_s() -> float:
    """Seconds since this process started (its creation time as the OS records it)."""
    import psutil

    return max(0.0, time.time() - psutil.Process(os.getpid()).create_time())


def record_stage_timing(
    stage: str, timings_dir: Path, stage_function: Callable[[], Any]
) -> tuple[Any, dict[str, float]]:
    """Run `stage_function()`, then write its timing split to `<timings_dir>/<stage>.json`.

    Returns the function's result and the timings. Nothing is written when it raises.
    """
    startup_s = process_age_s()
    tracking_before, import_before = tracking_seconds(), import_seconds()
    started = time.perf_counter()
    with counting_imports():
        result = stage_function()
    stage_s = time.perf_counter() - started
    tracking_s = tracking_seconds() - tracking_before
    import_s = import_seconds() - import_before
    timings = {
        "startup_s": round(startup_s, 3),
        "stage_s": round(stage_s, 3),
        "import_s": round(import_s, 3),
        "tracking_s": round(tracking_s, 3),
        "compute_s": round(stage_s - tracking_s - import_s, 3),
    }
    timings_dir.mkdir(parents=True, exist_ok=True)
    (timings_dir / f"{stage}.json").write_text(json.dumps({"stage": stage, **timings}, indent=2))
    return result, timings
