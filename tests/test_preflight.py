"""Disk and permissions: the preflight of a training stage and one error line at every write.

The faults are real: a small tmpfs mounted for the test is a full file system (tests run as
root, so a read-only folder cannot be made by permissions), and a regular file where a folder
must go gives ENOTDIR.
"""

import hashlib
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.files import CannotWriteError, write_json, writing
from rlhf_core.models.loading import save_model
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.preflight import (
    ModelSize,
    PreflightError,
    estimated_bytes,
    human_bytes,
    model_size,
    space_shortfalls,
)
from rlhf_core.stages.sft import run_sft
from rlhf_core.training.checkpoint import CheckpointManager

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@contextmanager
def small_file_system(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` (created) for the duration; unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write as many zeros into `folder` as its file system has free bytes."""
    (folder / "filler").write_bytes(b"\0" * shutil.disk_usage(folder).free)
    assert shutil.disk_usage(folder).free == 0


# --------------------------------------------------------------------------------------------
# The estimate (pure)


def test_the_estimate_is_the_model_plus_kept_checkpoints_with_optimizer_state():
    size = ModelSize(parameter_bytes=1000, trainable_bytes=400)
    assert estimated_bytes(size, keep_checkpoints=2, checkpoint_every=5) == {
        "model": 1000,
        "checkpoints": 3 * (1000 + 2 * 400),  # keep + 1 while the next one is written
    }
    assert estimated_bytes(size, keep_checkpoints=2, checkpoint_every=0)["checkpoints"] == 0


def test_model_size_counts_each_parameter_in_its_dtype_and_only_trainable_ones_as_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2).half())
    model[0].bias.requires_grad_(False)
    assert model_size(model) == ModelSize(110 * 4 + 22 * 2, 100 * 4 + 22 * 2)


def test_folders_on_one_file_system_need_their_sum():
    a, b, c = Path("/a"), Path("/b"), Path("/c")
    needs = {a: 600, b: 600, c: 10}
    short = space_shortfalls(needs, {a: 1000, b: 1000, c: 5}, {a: 1, b: 1, c: 2})
    assert short == [([a, b], 1000, 1200), ([c], 5, 10)]
    assert space_shortfalls(needs, {a: 1200, b: 1200, c: 10}, {a: 1, b: 1, c: 2}) == []


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1536, 3 * 1024**3)] == ["512 B", "1.5 KiB", "3.0 GiB"]


# --------------------------------------------------------------------------------------------
# The stage stops before training


def _write_params(project: Path, params, **sft_train) -> None:
    dumped = params.model_dump(mode="json")
    dumped["sft"]["train"].update(checkpoint_every=2, **sft_train)
    (project / "params.yaml").write_text(yaml.safe_dump(dumped))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_checkpoint_disk_stops_the_stage_before_training_with_one_line(
    tiny_project, tiny_params, mlflow_store, monkeypatch
):
    _write_params(tiny_project, tiny_params, keep_checkpoints=2)
    model_file = tiny_project / "artifacts" / "sft" / "model.safetensors"
    before = _sha(model_file)
    checkpoints = tiny_project / ".checkpoints"
    monkeypatch.chdir(tiny_project)
    with small_file_system(checkpoints, "1M"):
        result = runner.invoke(app, ["stage", "sft"])
        assert result.exit_code == 2, result.output
        assert list((checkpoints / "sft").iterdir()) == []  # no checkpoint: no step ran
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: sft: not enough free space for {checkpoints / 'sft'}: ")
    assert " free, about " in line and " MiB needed " in line
    assert "lower keep_checkpoints or move the project to a larger disk" in line
    assert "Traceback" not in result.output
    assert _sha(model_file) == before
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "tags.stage = 'sft'"
    )
    assert run.info.status == "FAILED" and "loss" not in run.data.metrics


def test_a_file_where_the_checkpoint_folder_goes_is_one_error_naming_it(
    tiny_project, tiny_params, mlflow_store
):
    (tiny_project / ".checkpoints").write_text("not a folder")
    settings = tiny_params.sft
    context = StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
    with pytest.raises(PreflightError) as error:
        run_sft(settings, context)
    assert str(error.value) == (
        f"cannot write sft checkpoints to {tiny_project / '.checkpoints' / 'sft'}: Not a "
        "directory; a file stands where a folder is needed on that path; move it away "
        "(checked before training)"
    )
    assert not (tiny_project / "artifacts" / "metrics" / "sft.json").exists()


def test_a_write_that_fails_after_training_exits_with_one_line_naming_the_file(
    tiny_project, tiny_params, mlflow_store, monkeypatch
):
    """The metrics file cannot be written (a folder stands at its path): found only when the
    whole training is done, it is still one line (exit 2) naming the file and what to do."""
    _write_params(tiny_project, tiny_params, epochs=1)
    metrics_file = tiny_project / "artifacts" / "metrics" / "sft.json"
    metrics_file.mkdir(parents=True)
    monkeypatch.chdir(tiny_project)
    result = runner.invoke(app, ["stage", "sft"])
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line == (
        f"error: cannot write the sft metrics to {metrics_file}: Is a "
        "directory; a folder stands where a file is needed; move it away"
    )
    assert "Traceback" not in result.output
    assert not [p for p in metrics_file.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# One line at each write


def test_a_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """The weights fit, the optimizer state does not: torch.save's zip writer says only
    'unexpected pos N vs M'; the error names the checkpoint and the full disk."""
    model = torch.nn.Linear(200, 200)  # 160 KiB of weights, 320 KiB of AdamW moments
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 200)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = tmp_path / "checkpoints"
    with small_file_system(folder, "256k"):
        manager = CheckpointManager(folder / "sft", keep=2)
        with pytest.raises(CannotWriteError) as error:
            manager.save(3, model, optimizer, scheduler)
        assert os.listdir(folder / "sft") == []  # the staging folder is gone
    assert str(error.value) == (
        f"cannot write checkpoint step 3 to {folder / 'sft' / 'step-00000003'}: No space left "
        "on device; the file system is full; free space there or point the project elsewhere"
    )
    assert "unexpected pos" in str(error.value.__cause__)


def test_metrics_on_a_full_disk_are_one_line_and_leave_no_temporary_file(tmp_path):
    folder = tmp_path / "metrics"
    with small_file_system(folder, "64k"):
        fill(folder)
        expected = r"^cannot write the sft metrics to .*sft\.json: No space left on device; "
        with pytest.raises(CannotWriteError, match=expected):
            write_json(folder / "sft.json", {"loss": [0.5] * 20000}, what="the sft metrics")
        assert os.listdir(folder) == ["filler"]


def test_a_model_saved_to_a_full_disk_is_one_line_naming_its_folder(tmp_path, base_and_tokenizer):
    model, tokenizer = base_and_tokenizer
    folder = tmp_path / "artifacts"
    with small_file_system(folder, "64k"):
        with pytest.raises(CannotWriteError) as error, writing("the SFT model", folder / "sft"):
            save_model(model, tokenizer, folder / "sft")
        assert os.listdir(folder) == []  # the staging folder is removed
    assert str(error.value).startswith(
        f"cannot write the SFT model to {folder / 'sft'}: No space left on device; "
    )


def test_a_write_under_a_regular_file_names_the_path(tmp_path):
    (tmp_path / "artifacts").write_text("a file, not a folder")
    with pytest.raises(CannotWriteError) as error:
        write_json(tmp_path / "artifacts" / "metrics" / "sft.json", {}, what="the sft metrics")
    assert str(error.value) == (
        f"cannot write the sft metrics to {tmp_path / 'artifacts' / 'metrics' / 'sft.json'}: "
        "Not a directory; a file stands where a folder is needed on that path; move it away"
    )


def test_errors_that_are_not_the_disks_pass_unchanged(tmp_path):
    with pytest.raises(KeyError), writing("the sft metrics", tmp_path / "sft.json"):
        raise KeyError("a bug, not a disk")


@pytest.fixture
def base_and_tokenizer(tiny_project):
    from rlhf_core.models.loading import load_causal_lm

    return load_causal_lm(str(ProjectPaths(tiny_project).base_model_dir))
