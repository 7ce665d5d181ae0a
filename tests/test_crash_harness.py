"""benchmarks/crash_harness.py: a stage SIGKILLed at random points mid-training and resumed
ends with the same weights as the uninterrupted run.

The test runs the harness as a command on one stage (SFT: 5 kills that land mid-training, each
a real SIGKILL of a child process); the four stages together take several minutes here and
are run by hand (`python -m benchmarks.crash_harness`, figures in the README).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.crash_harness import PROJECT_PARAMS, compare_weights

ROOT = Path(__file__).resolve().parent.parent


def test_the_harness_project_is_the_tiny_test_project():
    """The harness reuses the tests' tiny project as its template when it is given one."""
    from conftest import TINY_PARAMS

    assert PROJECT_PARAMS == TINY_PARAMS


def test_weights_that_differ_in_one_ulp_are_not_equal(tmp_path):
    tensor = torch.linspace(-1, 1, 12).reshape(3, 4)
    nudged = tensor.clone()
    nudged[1, 2] = float(np.nextafter(np.float32(nudged[1, 2]), np.float32(2)))
    for name, weights in (("a", tensor), ("b", tensor.clone()), ("c", nudged)):
        (tmp_path / name).mkdir()
        save_file({"w": weights}, str(tmp_path / name / "model.safetensors"))
    assert compare_weights(tmp_path / "a", tmp_path / "b") == (True, 0.0, [])
    equal, difference, differing = compare_weights(tmp_path / "a", tmp_path / "c")
    assert not equal and 0 < difference < 1e-6 and differing == ["model.safetensors:w"]
    (tmp_path / "d").mkdir()
    assert compare_weights(tmp_path / "a", tmp_path / "d")[0] is False  # no weights at all


@pytest.mark.slow
def test_sft_killed_five_times_mid_training_resumes_to_the_uninterrupted_weights(
    tiny_project_template, tmp_path
):
    workdir = tmp_path / "harness"
    shutil.copytree(tiny_project_template, workdir / "template", symlinks=True)
    figures = tmp_path / "figures.json"
    command = [sys.executable, "-m", "benchmarks.crash_harness", "--stages", "sft"]
    command += ["--kills", "5", "--seed", "3", "--workdir", str(workdir), "--json", str(figures)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    sft = json.loads(figures.read_text())["stages"]["sft"]
    assert sft["kills_landed"] >= 5 and sft["kills_survived"] == sft["kills_landed"]
    assert sft["all_equal"]
    for trial in sft["trials"]:
        assert trial["completed"] and trial["equal"] and trial["max_abs_difference"] == 0.0
        assert 0 <= trial["kill_after_s"] <= sft["training_s"]
    # Kills after the first checkpoint resume from it: the runs continued, not started over.
    assert any(trial["resumed_from"] > 0 for trial in sft["trials"] if trial["landed"])
    assert "sft     |" in done.stdout
