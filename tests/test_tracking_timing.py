"""The timing split of a stage process: start-up, imports, tracking and compute."""

from __future__ import annotations

import json
import sys
import time

import pytest

from rlhf_core.tracking.timing import record_stage_timing, tracking_time


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    """A module whose import takes 0.2 s (not yet imported)."""
    name = f"slow_import_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text("import time\ntime.sleep(0.2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_split_adds_up_and_is_written(tmp_path, slow_module):
    def stage():
        __import__(slow_module)  # 0.2 s of import
        with tracking_time():
            time.sleep(0.15)  # tracking
        time.sleep(0.1)  # compute
        return "done"

    result, timings = record_stage_timing("toy", tmp_path / "timings", stage)

    assert result == "done"
    assert timings["import_s"] >= 0.2
    assert 0.15 <= timings["tracking_s"] < 0.2 + 0.15
    assert 0.1 <= timings["compute_s"] < 0.2
    parts = timings["import_s"] + timings["tracking_s"] + timings["compute_s"]
    assert parts == pytest.approx(timings["stage_s"], abs=0.005)
    assert timings["startup_s"] > 0  # this test process started before the stage
    written = json.loads((tmp_path / "timings" / "toy.json").read_text())
    assert written == {"stage": "toy", **timings}


def test_import_inside_tracking_counts_once_as_tracking(tmp_path, slow_module):
    def stage():
        with tracking_time():
            __import__(slow_module)
            with tracking_time():  # nested claims do not double count
                time.sleep(0.05)

    _, timings = record_stage_timing("nested", tmp_path, stage)

    assert timings["import_s"] < 0.01
    assert 0.25 <= timings["tracking_s"] < timings["stage_s"] + 0.005
    assert timings["compute_s"] < 0.05


def test_already_imported_modules_cost_nothing(tmp_path):
    def stage():
        import json  # noqa: F401  (in sys.modules)
        import os  # noqa: F401

        time.sleep(0.05)

    _, timings = record_stage_timing("cached", tmp_path, stage)

    assert timings["import_s"] < 0.005
    assert timings["compute_s"] >= 0.05


def test_nothing_written_when_the_stage_fails(tmp_path):
    def stage():
        raise ValueError("bad params")

    with pytest.raises(ValueError, match="bad params"):
        record_stage_timing("broken", tmp_path, stage)
    assert not (tmp_path / "broken.json").exists()
