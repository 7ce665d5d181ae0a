"""The `rlhf` command line: every command has help, errors are one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from rlhf_core.app.cli import app

runner = CliRunner()


def _all_command_paths():
    root = get_command(app)
    paths = []

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


def test_every_command_has_help():
    paths = _all_command_paths()
    names = {" ".join(p) for p in paths}
    assert {"validate", "ingest", "params", "model build", "stage prepare", "demo"} <= names
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_console_script_help_runs_from_the_venv():
    script = Path(sys.executable).parent / "rlhf"
    assert script.exists(), "the rlhf console script is installed next to the interpreter"
    completed = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert completed.returncode == 0, completed.stderr
    assert "validate" in completed.stdout and "ingest" in completed.stdout


def test_params_command_reports_a_bad_key_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("modle: {}\n")
    result = runner.invoke(app, ["params", "--params", str(bad)])
    assert result.exit_code == 2
    assert "modle: unknown key" in result.output
    assert "Traceback" not in result.output


def test_params_command_prints_resolved_defaults(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    result = runner.invoke(app, ["params", "--params", str(empty)])
    assert result.exit_code == 0, result.output
    assert "trust_remote_code: false" in result.output


@pytest.mark.parametrize("kind", ["pairs", ""])
def test_validate_rejects_an_unknown_kind(tmp_path, kind):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    result = runner.invoke(app, ["validate", str(data), "--kind", kind, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--kind must be one of" in result.output


def _validate_preferences(data, out, params):
    """`rlhf validate DATA --kind preference --out OUT --params PARAMS`."""
    arguments = ["validate", str(data), "--kind", "preference", "--out", str(out)]
    return runner.invoke(app, [*arguments, "--params", str(params)])


def _pairs_file(path, good, bad_lines):
    import json

    rows = [
        json.dumps(
            {
                "prompt": f"Review film {i}.",
                "chosen": f"Film {i} was great.",
                "rejected": f"Film {i} was dull.",
            }
        )
        for i in range(good)
    ]
    path.write_text("\n".join(rows + ["{broken"] * bad_lines) + "\n")
    return path


def test_validate_command_writes_the_report_and_exits_zero_above_the_threshold(tmp_path):
    import json

    data = _pairs_file(tmp_path / "pairs.jsonl", good=19, bad_lines=1)
    out = tmp_path / "out"
    result = _validate_preferences(data, out, tmp_path / "absent.yaml")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["total"], report["valid"], report["quarantined"]) == (20, 19, 1)
    assert report["reasons"] == {"malformed_json": 1}
    assert (out / "quarantine.jsonl").read_text().count("\n") == 1
    assert (out / "data_docs" / "index.html").is_file()


def test_validate_command_exits_one_with_a_one_line_summary_below_the_threshold(tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl", good=5, bad_lines=5)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  validation:\n    min_valid_fraction: 0.8\n")
    result = _validate_preferences(data, tmp_path / "o", params)
    assert result.exit_code == 1
    assert "5/10 rows valid (50.0% < 80%)" in result.output


def test_stage_validate_says_which_set_failed_and_why(tiny_project, tiny_params, monkeypatch):
    import yaml

    (tiny_project / "params.yaml").write_text(yaml.safe_dump(tiny_params.model_dump(mode="json")))
    (tiny_project / "data" / "raw" / "preferences.jsonl").write_text("not json\n" * 9 + "{}\n")
    monkeypatch.chdir(tiny_project)
    result = runner.invoke(app, ["stage", "validate"])
    assert result.exit_code == 1
    assert (
        "validate: preference: 0/10 rows valid (0.0% < data.validation.min_valid_fraction 90%); "
        "top reasons: malformed_json 9, missing_field 1; quarantined rows in "
        "data/validated/preference/quarantine.jsonl"
    ) in result.output
    assert "validate: sft:" not in result.output  # only the sets that failed


def test_a_diverging_stage_exits_naming_the_step_and_keeps_the_model(
    tiny_project, tiny_params, mlflow_store, monkeypatch
):
    """A learning rate of 1e30 sends the weights to ~1e30 in one step: the second step's
    gradient (or loss) is not finite. The stage stops there, says so in one message (exit 2,
    as every stage error), writes no model (the one at artifacts/sft stays as it was) and its
    MLflow run ends FAILED."""
    import hashlib

    import yaml
    from mlflow import MlflowClient

    params = tiny_params.model_dump(mode="json")
    params["sft"]["train"].update(learning_rate=1e30, warmup_steps=0, max_grad_norm=0.0)
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    model_file = tiny_project / "artifacts" / "sft" / "model.safetensors"
    before = hashlib.md5(model_file.read_bytes()).hexdigest()
    monkeypatch.chdir(tiny_project)
    result = runner.invoke(app, ["stage", "sft"])
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: sft optimizer step 2 of ")
    assert "(examples " in line and ("is nan." in line or "is inf." in line)
    assert "Traceback" not in result.output
    assert hashlib.md5(model_file.read_bytes()).hexdigest() == before
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "tags.stage = 'sft'"
    )
    assert run.info.status == "FAILED"


def test_a_stage_with_a_tracking_server_that_does_not_answer_stops_at_once(
    tiny_project, tiny_params, monkeypatch
):
    """One line naming the store (credentials masked) before any work, instead of minutes of
    client retries and a traceback in the middle of training."""
    import yaml

    from rlhf_core.app.processes import free_port

    (tiny_project / "params.yaml").write_text(yaml.safe_dump(tiny_params.model_dump(mode="json")))
    dead = f"http://alice:s3cr3t@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.chdir(tiny_project)
    result = runner.invoke(app, ["stage", "sft"])
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "127.0.0.1" in line and "s3cr3t" not in result.output
    assert not (tiny_project / "artifacts" / "metrics" / "sft.json").exists()
