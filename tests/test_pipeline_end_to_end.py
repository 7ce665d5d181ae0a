"""The real pipeline end to end on a tiny config, in a temporary git + DVC copy of the project.

`rlhf run` (the Prefect flow over the real `rlhf stage` commands) builds every stage and
promotes a first champion whose lineage reaches the data md5s; a second run skips every
stage; a param change reruns only its dependents; `dvc repro`, `dvc exp run -S`,
`dvc exp show`, `dvc metrics diff`, `dvc plots show` and a `dvc push` / `dvc pull` round trip
work on the result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.pipeline import project_environment, scratch_project
from benchmarks.settings import QUICK_PIPELINE_PARAMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the project with a nano model and a few dozen rows."""
    root = tmp_path_factory.mktemp("e2e") / "project"
    scratch_project(REPO, root, QUICK_PIPELINE_PARAMS)
    return root, project_environment(root)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    completed = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, (command, completed.stdout[-3000:], completed.stderr[-3000:])
    return completed.stdout


def _pipeline(root: Path, env: dict[str, str]) -> dict:
    """`rlhf run` in its own process, as a user runs it; returns the flow's summary."""
    script = (
        "import json, sys\n"
        "from rlhf_core.orchestration import run_pipeline\n"
        "summary = run_pipeline(sys.argv[1])\n"
        "print('SUMMARY=' + json.dumps({k: summary[k] for k in ('stages', 'gate')}, default=str))\n"
    )
    out = _run([sys.executable, "-c", script, str(root)], root, env)
    line = next(line for line in out.splitlines() if line.startswith("SUMMARY="))
    return json.loads(line.removeprefix("SUMMARY="))


def _statuses(summary: dict) -> dict[str, str]:
    return {stage["stage"]: stage["status"] for stage in summary["stages"]}


def test_pipeline_end_to_end(project):
    from mlflow import MlflowClient

    from rlhf_core.registry import CHAMPION, POLICY_MODEL
    from rlhf_core.tracking import path_md5, tracking_uri

    root, env = project
    expected = ["prepare", "validate", "sft", "reward", "policy@dpo", "policy@ppo", "evaluate"]

    first = _pipeline(root, env)
    assert [s["stage"] for s in first["stages"]] == expected
    assert set(_statuses(first).values()) == {"ran"}
    assert first["gate"]["status"] == "promoted"
    evaluation = json.loads((root / "artifacts/metrics/evaluate.json").read_text())
    for policy in ("sft", "dpo", "ppo", "bon_2"):
        assert {"gold_win_rate_vs_sft", "rm_win_rate_vs_sft", "kl_to_sft"} <= set(
            evaluation[policy]
        )

    # The champion's lineage reaches the md5 of the data it was trained on.
    client = MlflowClient(tracking_uri(root))
    champion = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION)
    lineage = {k: v for k, v in champion.tags.items() if k.startswith("lineage.data.")}
    assert lineage["lineage.data.validated/preference.md5"] == path_md5(
        root / "data/validated/preference"
    )
    champion_run = client.get_run(champion.run_id)
    parent_id = champion_run.data.tags["mlflow.parentRunId"]
    stage_runs = client.search_runs(
        [champion_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert {run.data.tags["stage"] for run in stage_runs} >= {"sft", "reward", "dpo", "ppo"}

    # Nothing changed: every stage is skipped, and plain `dvc repro` has nothing to do.
    second = _pipeline(root, env)
    assert set(_statuses(second).values()) == {"skipped"}
    assert second["gate"]["status"] == "unchanged"
    assert "up to date" in _run(["dvc", "repro"], root, env)

    # A DPO param reruns only policy@dpo and evaluate.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["policy"]["dpo"]["beta"] = 0.3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _pipeline(root, env)
    reran = {stage for stage, status in _statuses(third).items() if status != "skipped"}
    assert reran == {"policy@dpo", "evaluate"}

    # The DVC workflow people use around it.
    _run(["git", "add", "-A"], root, env)
    _run(
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "b"],
        root,
        env,
    )
    _run(["dvc", "exp", "run", "-S", "policy.dpo.beta=0.5"], root, env)
    experiments = json.loads(_run(["dvc", "exp", "show", "--json"], root, env))
    assert "0.5" in json.dumps(experiments)
    # The metric files are committed with the code (git-ignored are only the cached outputs),
    # so the diff against HEAD shows what the experiment changed.
    assert "artifacts/metrics/dpo.json" in _run(["git", "ls-files"], root, env)
    assert "artifacts/metrics/dpo.json" in _run(["dvc", "metrics", "diff"], root, env)
    _run(["dvc", "plots", "show", "-o", str(root / "plots_html")], root, env)
    assert (root / "plots_html" / "index.html").is_file()

    # Push to the project's local remote, drop cache and outputs, pull them back.
    sft_md5 = path_md5(root / "artifacts/sft")
    _run(["dvc", "push"], root, env)
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "artifacts" / "sft")
    _run(["dvc", "pull"], root, env)
    assert path_md5(root / "artifacts/sft") == sft_md5


def _retrain(root: Path, env: dict[str, str]) -> dict:
    script = (
        "import json, sys\n"
        "from rlhf_core.orchestration import run_retrain\n"
        "outcome = run_retrain(sys.argv[1])\n"
        "print('OUTCOME=' + json.dumps({k: outcome[k] for k in ('status', 'decision')},"
        " default=str))\n"
    )
    out = _run([sys.executable, "-c", script, str(root)], root, env)
    line = next(line for line in out.splitlines() if line.startswith("OUTCOME="))
    return json.loads(line.removeprefix("OUTCOME="))


def _new_preferences(path: Path, tag: str) -> None:
    rows = [
        {
            "prompt": f"Write a short review of Film {tag}{i}, a drama.",
            "chosen": f"Film {tag}{i} was a wonderful and moving drama. I loved the acting.",
            "rejected": f"Film {tag}{i} was a dull drama. The acting was poor.",
        }
        for i in range(12)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def _set_gate(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_retrain_on_new_data_promotes_only_through_the_gate(project):
    """Runs after test_pipeline_end_to_end (same project): a champion exists."""
    from mlflow import MlflowClient

    from rlhf_core.registry import CHAMPION, POLICY_MODEL
    from rlhf_core.tracking import tracking_uri

    root, env = project
    client = MlflowClient(tracking_uri(root))
    before = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version

    assert _retrain(root, env)["status"] == "no_new_data"

    # A gate the candidate passes: new data -> retrain -> the new version becomes champion.
    _set_gate(root, min_win_rate_vs_champion=0.0, max_kl=1.0e6)
    _new_preferences(root / "data" / "incoming" / "batch-a.jsonl", "A")
    promoted = _retrain(root, env)
    assert promoted["status"] == "retrained"
    assert promoted["decision"]["status"] == "promoted"
    after = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version
    assert int(after) > int(before)
    assert (root / "data" / "incoming" / "processed" / "batch-a.jsonl").is_file()

    # A gate no candidate can pass (a win rate above 1): the champion stays.
    _set_gate(root, min_policy_metric=1.5)
    _new_preferences(root / "data" / "incoming" / "batch-b.jsonl", "B")
    kept = _retrain(root, env)
    assert kept["status"] == "retrained"
    assert kept["decision"]["status"] == "kept"
    assert client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version == after
