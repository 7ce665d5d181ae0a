"""MLflow stage runs: params, metric curves, datasets, artifacts, nesting, failure, the store."""

import json
import os
import shutil
import subprocess

import mlflow
import pandas as pd
import pytest
from dvc_hashes import dvc_md5, md5
from matplotlib.figure import Figure
from mlflow import MlflowClient

from rlhf_core.tracking.experiment import (
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NAME,
    MODEL_TRAINING,
    tracking_uri,
)
from rlhf_core.tracking.lineage import git_state, run_marker_path
from rlhf_core.tracking.runs import FLUSH_EVERY_CALLS, flatten_params, stage_run


@pytest.fixture
def client(tracking_store):
    """The MlflowClient of the module's store."""
    return tracking_store[1]


def _git(repo, *args):
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _git_repo(path):
    path.mkdir()
    _git(path, "init", "-q")
    (path / "code.py").write_text("print('v1')\n")
    (path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(path, "add", ".")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return path


def test_flatten_params_dotted_keys_lists_as_json():
    nested = {
        "sft": {"lr": 0.001, "layers": [1, 2], "optim": {"name": "adamw", "betas": (0.9, 0.95)}},
        "seed": 7,
        "model": None,
        "extra": {},
    }
    assert flatten_params(nested) == {
        "sft.lr": "0.001",
        "sft.layers": "[1, 2]",
        "sft.optim.name": "adamw",
        "sft.optim.betas": "[0.9, 0.95]",
        "seed": "7",
        "model": "None",
        "extra": "{}",
    }


def test_params_flattened_and_more_than_100_logged(client, tmp_path):
    params = {"group": {f"knob_{i:03d}": i * 0.5 for i in range(150)}, "sft": {"layers": [4, 8]}}
    with stage_run("params", project_root=tmp_path, params=params) as run:
        pass
    logged = client.get_run(run.run_id).data.params
    assert len(logged) == 151
    assert logged["group.knob_149"] == "74.5"
    assert logged["sft.layers"] == "[4, 8]"


def test_free_text_keys_are_logged_whole_as_json(client, tmp_path):
    """MLflow refuses "?" in a param name: a mapping keyed by questions stays one JSON value."""
    questions = {"What is the capital of France?": "Paris", "Sky's colour?": "blue"}
    params = {"evaluate": {"sanity_prompts": questions, "batch_size": 8}}
    assert flatten_params(params) == {
        "evaluate.sanity_prompts": json.dumps(questions),
        "evaluate.batch_size": "8",
    }
    with stage_run("free-text", project_root=tmp_path, params=params) as run:
        pass
    logged = client.get_run(run.run_id).data.params
    assert json.loads(logged["evaluate.sanity_prompts"]) == questions


def test_metric_history_per_step_exact_across_buffered_flushes(client, tmp_path):
    steps = FLUSH_EVERY_CALLS * 2 + 20
    losses = [1.0 / (step + 1) for step in range(steps)]
    with stage_run("metrics", project_root=tmp_path) as run:
        for step, loss in enumerate(losses):
            run.log_metrics({"train/loss": loss, "train/step_x2": 2.0 * step}, step=step)
        assert run.flush(timeout_s=30)  # the background writer sent every step so far
        assert len(client.get_metric_history(run.run_id, "train/loss")) == steps
        run.log_metrics({"train/loss": 0.0, "train/step_x2": 2.0 * steps}, step=steps)
        losses.append(0.0)
        steps += 1
    history = client.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(losses))
    doubled = client.get_metric_history(run.run_id, "train/step_x2")
    assert sorted((m.step, m.value) for m in doubled) == [(s, 2.0 * s) for s in range(steps)]


def test_git_commit_and_dirty_tags(client, tmp_path):
    repo = _git_repo(tmp_path / "repo")
    with stage_run("git", project_root=repo) as run:
        pass
    tags = client.get_run(run.run_id).data.tags
    assert tags["git_commit"] == _git(repo, "rev-parse", "HEAD")
    assert tags["git_dirty"] == "false"
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert git_state(repo)[1] == "false"  # dvc repro rewrites dvc.lock: not code drift
    (repo / "code.py").write_text("print('v2')\n")
    assert git_state(repo)[1] == "true"


def test_run_nested_under_parent_from_environment(client, tmp_path, monkeypatch):
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    parent = client.create_run(experiment.experiment_id, run_name="pipeline")
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", parent.info.run_id)
    with stage_run("sft", project_root=tmp_path) as child:
        pass
    tags = client.get_run(child.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["mlflow.runName"] == "sft"
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", "0" * 32)
    with (
        pytest.raises(ValueError, match="is not a run in"),
        stage_run("sft", project_root=tmp_path),
    ):
        pass


def test_dataset_inputs_carry_filemd5(client, tmp_path):
    frame = pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]],
            "chosen": ["great", "fine"],
            "rejected": ["bad", "meh"],
        }
    )
    path = tmp_path / "pairs.parquet"
    frame.to_parquet(path)
    digest = md5(path.read_bytes())
    with stage_run("reward", project_root=tmp_path) as run:
        run.log_dataset(path, "prefs")
        run.log_dataset(frame.head(1), "eval", context="evaluation", source=path)
        with pytest.raises(ValueError, match="pass source="):
            run.log_dataset(frame, "orphan")
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {f"prefs@{digest[:12]}", f"eval@{digest[:12]}"}
    prefs_tags = {t.key: t.value for t in by_name[f"prefs@{digest[:12]}"].tags}
    assert prefs_tags == {"mlflow.data.context": "training", "md5": digest}
    eval_tags = {t.key: t.value for t in by_name[f"eval@{digest[:12]}"].tags}
    assert eval_tags["mlflow.data.context"] == "evaluation"
    assert json.loads(by_name[f"prefs@{digest[:12]}"].dataset.source)["uri"] == str(path.resolve())


def test_exception_marks_run_failed_and_propagates(client, tmp_path):
    out = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="diverged"),
        stage_run("ppo", project_root=tmp_path) as r,
    ):
        r.log_metrics({"reward": 0.5}, step=0)  # still buffered when the error comes
        out.mkdir()
        r.record_output(out)
        raise RuntimeError("loss diverged")
    run = client.get_run(r.run_id)
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(r.run_id, "reward")] == [0.5]
    assert not run_marker_path(out).exists()  # a failed stage produced nothing to link to


def test_output_recorded_but_never_written_fails_the_run(client, tmp_path):
    with (
        pytest.raises(ValueError, match="recorded but never written"),
        stage_run("sft", project_root=tmp_path) as r,
    ):
        r.record_output(tmp_path / "artifacts" / "sft")
    assert client.get_run(r.run_id).info.status == "FAILED"


def test_figures_artifacts_dicts_and_model_dirs_listed(client, tmp_path):
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.csv").write_text("step,loss\n0,1.0\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"w")
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1.0, 0.5])
    with stage_run("evaluate", project_root=tmp_path) as run:
        run.log_figure(figure, "plots/reward_curve.png")
        run.log_artifact(report, "reports")
        run.log_artifacts(plots, "tables")
        run.log_dict({"accuracy": 0.75}, "metrics/eval.json")
        run.log_model_dir(model_dir, "policy")
        with pytest.raises(ValueError, match="not a save_pretrained model directory"):
            run.log_model_dir(plots, "bad")

    def listed(path=None):
        return {a.path for a in client.list_artifacts(run.run_id, path)}

    assert listed() == {"plots", "reports", "tables", "metrics"}  # the model is apart
    assert listed("plots") == {"plots/reward_curve.png"}
    assert listed("reports") == {"reports/report.html"}
    assert listed("tables") == {"tables/a.csv"}
    saved = mlflow.artifacts.load_dict(
        f"{client.get_run(run.run_id).info.artifact_uri}/metrics/eval.json"
    )
    assert saved == {"accuracy": 0.75}
    tags = client.get_run(run.run_id).data.tags
    assert tags["model.policy.md5"] == dvc_md5(model_dir, tmp_path / "cache")
    # The directory is an MLflow model of the run: MLmodel plus a copy of the folder.
    logged = client.get_logged_model(tags["model.policy.model_id"])
    assert logged.name == "policy" and logged.source_run_id == run.run_id
    copied = mlflow.artifacts.list_artifacts(f"{logged.artifact_location}/artifacts/model")
    assert {f.path for f in copied} == {"model/config.json", "model/model.safetensors"}


def test_default_store_lives_in_project_whatever_the_cwd(tracking_store, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(tracking_store[0] / "mlflow.db", project / "mlflow.db")  # skip a fresh migration
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("RLHF_EXPERIMENT", "own-experiment")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri_before = mlflow.get_tracking_uri()
    with stage_run("prepare", project_root=project) as run:
        run.log_dict({"ok": True}, "check.json")
    assert tracking_uri(project) == f"sqlite:///{project.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri(project))
    experiment = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert experiment.name == "own-experiment"
    assert experiment.artifact_location == (project / "mlruns").resolve().as_uri()
    assert list((project / "mlruns").rglob("check.json"))
    assert not any(elsewhere.iterdir())  # nothing written into the CWD
    assert mlflow.get_tracking_uri() == uri_before  # the process-wide URI is restored
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_stage_run_leaves_no_tracking_uri_in_the_environment(
    tracking_store, tmp_path, monkeypatch
):
    """MLflow's set_tracking_uri also writes the env var; a leftover global URI must not leak."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(tracking_store[0] / "mlflow.db", project / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(
        "mlflow.tracking._tracking_service.utils._tracking_uri", f"sqlite:///{tmp_path}/other.db"
    )
    with stage_run("prepare", project_root=project):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_stage_run_names_carry_the_label_and_the_experiment_is_model_training(client, tmp_path):
    with stage_run("dpo", project_root=tmp_path, label="sigmoid beta=0.1") as run:
        pass
    stored = client.get_run(run.run_id)
    assert stored.info.run_name == "dpo sigmoid beta=0.1"
    assert stored.data.tags["stage"] == "dpo"
    experiment = client.get_experiment(stored.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


DIE_IN_A_RUN = """\
import os, signal, sys
from pathlib import Path
from rlhf_core.tracking.runs import stage_run

with stage_run("orphan-probe", project_root=Path(sys.argv[1])) as run:
    Path(sys.argv[2]).write_text(run.run_id)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would
"""


def test_a_run_whose_process_died_is_failed_by_the_next_run_and_a_live_one_is_not(
    tracking_store, tmp_path
):
    """SIGKILL leaves a stage's run RUNNING; the next run of that stage ends it FAILED with the
    reason. A run whose process still runs (this test's, open beside the new one) is left
    alone."""
    import sys

    _, client = tracking_store
    script, id_file = tmp_path / "die_in_a_run.py", tmp_path / "run_id"
    script.write_text(DIE_IN_A_RUN)
    with stage_run("orphan-probe", project_root=tmp_path) as live:
        died = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(id_file)], timeout=300
        )
        assert died.returncode == -9
        dead_id = id_file.read_text()
        assert client.get_run(dead_id).info.status == "RUNNING"  # what a kill leaves behind
        with stage_run("orphan-probe", project_root=tmp_path):
            pass
        ended = client.get_run(dead_id)
        assert ended.info.status == "FAILED"
        assert "ended without ending the run" in ended.data.tags["ended_by"]
        assert client.get_run(live.run_id).info.status == "RUNNING"
    assert client.get_run(live.run_id).info.status == "FINISHED"
