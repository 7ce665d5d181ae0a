"""The real pipeline end to end on a tiny config, in a temporary git + DVC copy of the project.

`rlhf run` (the Prefect flow over the real `rlhf stage` commands), measured as `make bench`
measures it, builds every stage and promotes a first champion whose lineage reaches the data
md5s; a second run skips every stage; a param change reruns only its dependents and meets a
gate it cannot pass; new data retrains and promotes; `dvc repro`, `dvc exp run -S`,
`dvc exp show`, `dvc metrics diff`, `dvc plots show` and a `dvc push` / `dvc pull` round trip
work on the result; last, `rlhf sweep` queues DPO and PPO points as DVC experiments on the
built SFT and reward model and writes the reward–KL frontier (`dvc exp apply` takes a point).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from servers import seed_prefect_database

from benchmarks.pipeline import measure_project_pipeline, project_environment, scratch_project
from benchmarks.settings import QUICK_PIPELINE_PARAMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A git + DVC copy of the project with a nano model and a few dozen rows, and a Prefect
    server of its own (`prefect server start`, as a team runs one) that every flow run of the
    module records to: PREFECT_API_URL in the environment."""
    from rlhf_core.app.prefect_server import PREFECT_HOME_DIR, prefect_server

    root = tmp_path_factory.mktemp("e2e") / "project"
    scratch_project(REPO, root, QUICK_PIPELINE_PARAMS)
    seed_prefect_database(root / PREFECT_HOME_DIR)  # a migrated copy: the server skips migrations
    with prefect_server(root) as api_url:
        yield root, {**project_environment(root), "PREFECT_API_URL": api_url}


@pytest.fixture(scope="module")
def measured(project) -> dict:
    """The benchmark's pipeline measurement (`benchmarks.pipeline`) on the project: `rlhf run`
    from nothing, then again with nothing to do, each as a user runs it (its own process),
    then an empty flow and a no-op `dvc repro`. The flows record to the module's Prefect
    server (`make bench` measures Prefect's ephemeral mode, which starts a temporary API per
    flow run: about 10-25 s each here, spent on nothing these tests check)."""
    root, env = project
    return measure_project_pipeline(root, root.parent / "bench-logs", repeats=1, env=env)


def _flow_runs(env: dict[str, str], flow_name: str) -> list[str]:
    """State names of the server's runs of `flow_name`, oldest first."""
    script = (
        "import asyncio, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
        "from prefect.client.schemas.sorting import FlowRunSort\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        "        runs = await client.read_flow_runs(\n"
        "            flow_filter=FlowFilter(name=FlowFilterName(any_=[sys.argv[1]])),\n"
        "            sort=FlowRunSort.START_TIME_ASC)\n"
        "    print('STATES=' + ','.join(run.state_name for run in runs))\n"
        "asyncio.run(main())\n"
    )
    out = _run([sys.executable, "-c", script, flow_name], REPO, env)
    line = next(line for line in out.splitlines() if line.startswith("STATES="))
    return [name for name in line.removeprefix("STATES=").split(",") if name]


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    completed = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, (command, completed.stdout[-3000:], completed.stderr[-3000:])
    return completed.stdout


def _launched(root: Path, env: dict[str, str], launcher: str, outcome: str) -> dict:
    """`rlhf_core.app.launch.<launcher>(root)` in its own process, as a user runs it; returns
    `outcome`, a Python expression over its `result`, as JSON."""
    script = (
        "import json, sys\n"
        f"from rlhf_core.app.launch import {launcher}\n"
        f"result = {launcher}(sys.argv[1])\n"
        f"print('RESULT=' + json.dumps({outcome}, default=str))\n"
    )
    out = _run([sys.executable, "-c", script, str(root)], root, env)
    line = next(line for line in out.splitlines() if line.startswith("RESULT="))
    return json.loads(line.removeprefix("RESULT="))


def _pipeline(root: Path, env: dict[str, str]) -> dict:
    """`rlhf run`: the flow's stages, gate and parent MLflow run."""
    keys = ("stages", "gate", "mlflow_run_id")
    return _launched(root, env, "run_pipeline", f"{{k: result[k] for k in {keys!r}}}")


def _statuses(summary: dict) -> dict[str, str]:
    return {stage["stage"]: stage["status"] for stage in summary["stages"]}


def _pipeline_runs(client, experiment_id: str) -> list:
    """The pipeline (parent) runs, oldest first."""
    return client.search_runs(
        [experiment_id],
        filter_string="tags.stage = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


def test_the_benchmark_measures_the_pipelines_overhead(project, measured):
    root, _ = project
    assert set(measured["stages"]) == {
        "prepare",
        "validate",
        "sft",
        "reward",
        "dpo",
        "ppo",
        "evaluate",
    }
    assert 0 < measured["compute_s"] < measured["total_s"]
    assert measured["overhead_fraction"] == pytest.approx(
        1 - measured["compute_s"] / measured["total_s"]
    )
    assert measured["startup_s"] > 0 and measured["tracking_s"] > 0
    assert measured["noop_dvc_repro_s"] > 0 and measured["noop_flow_wall_s"] > 0
    first_run_log = root.parent / "bench-logs" / "pipeline_first_run.log"
    assert "Held-out evaluation" in first_run_log.read_text()


def test_pipeline_end_to_end(project, measured):
    from mlflow import MlflowClient

    from rlhf_core.tracking.experiment import tracking_uri
    from rlhf_core.tracking.lineage import path_md5
    from rlhf_core.tracking.registry import CHAMPION, POLICY_MODEL
    from rlhf_core.tracking.registry_lineage import version_lineage

    root, env = project
    expected = ["prepare", "validate", "sft", "reward", "policy@dpo", "policy@ppo", "evaluate"]
    client = MlflowClient(tracking_uri(root))
    evaluation = json.loads((root / "artifacts/metrics/evaluate.json").read_text())
    for policy in ("sft", "dpo", "ppo", "bon_2"):
        assert {"gold_win_rate_vs_sft", "rm_win_rate_vs_sft", "kl_to_sft"} <= set(
            evaluation[policy]
        )

    # The champion's lineage reaches the md5 of the data it was trained on.
    champion = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION)
    lineage = version_lineage(client, champion)
    assert lineage["data"]["data/validated/preference"] == path_md5(
        root / "data/validated/preference"
    )
    champion_run = client.get_run(champion.run_id)
    experiment_id = champion_run.info.experiment_id
    parent_id = champion_run.data.tags["mlflow.parentRunId"]
    # The measured first run (`rlhf run`) ran every stage in DAG order and promoted; the no-op
    # run skipped every stage and left the gate unchanged.
    first, noop = _pipeline_runs(client, experiment_id)
    assert first.info.run_id == parent_id
    summary = client.download_artifacts(parent_id, "pipeline/summary.json", str(root.parent))
    rows = json.loads(Path(summary).read_text())["stages"]
    assert [row["stage"] for row in rows] == expected
    assert {row["status"] for row in rows} == {"ran"}
    assert first.data.tags["gate.status"] == "promoted"
    assert noop.info.run_name.startswith("#2 no change | data ")
    assert {noop.data.tags[f"stage.{s.replace('@', '.')}.status"] for s in expected} == {"skipped"}
    assert noop.data.tags["gate.status"] == "unchanged"
    stage_runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    stages = {"prepare", "validate", "sft", "reward", "dpo", "ppo", "evaluate"}
    assert {run.data.tags["stage"] for run in stage_runs} >= stages
    by_stage = {run.data.tags["stage"]: run for run in stage_runs}
    validate_run = by_stage["validate"]
    assert (
        validate_run.data.metrics["preference.total"]
        == validate_run.data.metrics["preference.valid"]
        + validate_run.data.metrics["preference.quarantined"]
    )
    docs = {a.path for a in client.list_artifacts(validate_run.info.run_id, "data_docs")}
    assert "data_docs/preference" in docs
    assert by_stage["prepare"].data.metrics["base_model.parameters"] > 0
    assert by_stage["dpo"].info.run_name.startswith("dpo sigmoid beta=0.1")
    # The pipeline run: a name that says what it is, and the headline metrics as columns.
    assert first.info.run_name.startswith("#1 first run | data ")
    for key in ("reward.eval_accuracy", "dpo.gold_win_rate_vs_sft", "ppo.kl_to_sft"):
        assert key in first.data.metrics, key
    assert first.data.metrics["gate.promoted"] == 1.0
    assert "up to date" in _run(["dvc", "repro"], root, env)

    # A DPO param reruns only policy@dpo and evaluate; a gate no candidate can pass (a win
    # rate above 1) keeps the champion.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["policy"]["dpo"]["beta"] = 0.3
    params["gate"]["min_policy_metric"] = 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _pipeline(root, env)
    reran = {stage for stage, status in _statuses(third).items() if status != "skipped"}
    assert reran == {"policy@dpo", "evaluate"}
    assert third["gate"]["status"] == "kept"
    assert client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version == champion.version
    third_run = client.get_run(third["mlflow_run_id"])
    name = third_run.info.run_name
    assert name.startswith("#3 ") and " | data " in name, name
    assert "policy.dpo.beta=0.3" in name and "gate.min_policy_metric=1.5" in name, name
    assert third_run.data.params["policy.dpo.beta"] == "0.3"
    # The Prefect server in PREFECT_API_URL recorded this run and the two measured ones.
    assert _flow_runs(env, "rlhf-pipeline") == ["Completed"] * 3

    # The DVC workflow people use around it.
    _run(["git", "add", "-A"], root, env)
    _run(
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "b"],
        root,
        env,
    )
    # The metric files are committed with the code (git-ignored are only the cached outputs),
    # so `dvc metrics diff` against HEAD shows what an experiment changed (the sweep's test
    # runs experiments and applies one).
    assert "artifacts/metrics/dpo.json" in _run(["git", "ls-files"], root, env)
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
    """`rlhf retrain` once: the stages it ran, its status and the gate's decision."""
    outcome = (
        "{'ran': (result['pipeline'] or {}).get('ran'), 'status': result['status'], "
        "'decision': result['decision']}"
    )
    return _launched(root, env, "run_retrain", outcome)


def _votes_batch(root: Path, count: int) -> Path:
    """`count` votes as `rlhf label` records them, through its votes log: the batch file of
    their preference rows that the log writes to data/incoming/."""
    from test_votes import vote

    from rlhf_core.data.votes import VoteJournal
    from rlhf_core.paths import ProjectPaths

    paths = ProjectPaths(root)
    journal = VoteJournal(paths.labels_dir, paths.incoming_dir, batch_size=count)
    batches = [
        journal.append(vote(number, "a" if number % 3 else "b")).batch for number in range(count)
    ]
    assert batches[:-1] == [None] * (count - 1) and batches[-1] is not None
    return batches[-1]


def _set_gate(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_retrain_on_new_data_reruns_what_reads_it_and_promotes(project):
    """Runs after test_pipeline_end_to_end (same project): a champion exists, and the gate of
    params.yaml cannot be passed until this test opens it."""
    from mlflow import MlflowClient

    from rlhf_core.tracking.experiment import tracking_uri
    from rlhf_core.tracking.registry import CHAMPION, POLICY_MODEL

    root, env = project
    client = MlflowClient(tracking_uri(root))
    before = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version

    # A gate the candidate passes: new data -> retrain -> the new version becomes champion.
    _set_gate(root, min_policy_metric=0.0, min_win_rate_vs_champion=0.0, max_kl=1.0e6)
    # People's votes in `rlhf label` are the new data: the retrain ingests their batch.
    batch = _votes_batch(root, 12)
    promoted = _retrain(root, env)
    assert promoted["status"] == "retrained"
    # New preference rows rerun what reads them, and neither prepare nor SFT: validate's
    # output holds no timestamps, so the SFT set keeps its md5.
    assert set(promoted["ran"]) == {"validate", "reward", "policy@dpo", "policy@ppo", "evaluate"}
    assert promoted["decision"]["status"] == "promoted"
    after = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION).version
    assert int(after) > int(before)
    assert (root / "data" / "incoming" / "processed" / batch.name).is_file()
    assert _flow_runs(env, "rlhf-retrain") == ["Completed"]


@contextmanager
def _rlhf_ui(root: Path, env: dict[str, str], port: int) -> Iterator[str]:
    """`rlhf ui` on the project, as a user starts it; yields the address it prints once the UI
    answers, and stops it with SIGTERM after (it must exit and free the port)."""
    log = root / "rlhf-ui.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["rlhf", "ui", "--project", str(root), "--port", str(port)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while not (ready := re.search(r"MLflow UI ready: (\S+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield ready.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()


def _show_metric_column(page, metric: str) -> list[str]:
    """Tick one metric in the runs table's Columns menu; the texts of its cells."""
    page.get_by_role("button", name="Columns", exact=True).click()
    page.get_by_placeholder("Search columns").fill(metric)
    exactly = re.compile(f"^{re.escape(metric)}$")
    page.locator("[class*=tree-title]").filter(has_text=exactly).click()
    page.keyboard.press("Escape")
    column = f'[col-id="metrics.`{metric}`"]'
    page.locator(f"[role=columnheader]{column}").wait_for()
    cells = page.locator(f"[role=gridcell]{column}")
    return [cells.nth(index).inner_text() for index in range(cells.count())]


def test_mlflow_ui_compares_the_pipeline_runs_in_a_real_browser(project):
    """Runs after the tests above: pipeline #1 (first run) and #3 (policy.dpo.beta=0.3)."""
    from browser import chromium_page, screenshot
    from mlflow import MlflowClient

    from rlhf_core.app.processes import free_port
    from rlhf_core.tracking.experiment import experiment_name, tracking_uri

    root, env = project
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name(experiment_name())
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.stage = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )
    names = [run.info.run_name for run in runs]
    first, beta = names[0], next(name for name in names if "policy.dpo.beta=0.3" in name)
    assert first.startswith("#1 first run")
    assert first != beta
    headline = ("reward.eval_accuracy", "dpo.gold_win_rate_vs_sft", "dpo.kl_to_sft")
    beta_run = next(run for run in runs if run.info.run_name == beta)
    [dpo_run] = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{beta_run.info.run_id}' and tags.stage = 'dpo'",
    )

    with _rlhf_ui(root, env, free_port()) as url, chromium_page(width=2200) as page:
        # `rlhf ui` opens the model-training view of the pipeline runs, not MLflow's GenAI view.
        assert f"/#/experiments/{experiment.experiment_id}/runs?" in url
        assert "workflowType=machine_learning" in url
        page.goto(url)
        for name in (first, beta):
            page.get_by_text(name, exact=True).wait_for()
        for metric in headline:
            shown = sorted(float(text) for text in _show_metric_column(page, metric))
            # One value per pipeline run, each the one MLflow holds.
            assert shown == pytest.approx(sorted(run.data.metrics[metric] for run in runs))
        page.get_by_role("button", name="Close").first.click()  # the assistant panel
        for column in ("attributes.`Run Name`", *(f"metrics.`{m}`" for m in headline)):
            header = page.locator(f'[role=columnheader][col-id="{column}"]')
            header.locator(".ag-header-cell-resize").dblclick()  # fit names and numbers
        screenshot(page, "mlflow-ui/runs-table", height=420)

        base = url.split("/#/")[0]
        page.goto(
            f"{base}/#/experiments/{experiment.experiment_id}/runs/{dpo_run.info.run_id}"
            "/model-metrics?workflowType=machine_learning"
        )
        # A stage run's page draws its curves: each chart's legend names the run and metric.
        page.get_by_placeholder("Search metric charts").fill("loss")
        for metric in ("loss", "eval/loss"):
            page.get_by_text(f"{dpo_run.info.run_name} ({metric})", exact=True).first.wait_for()
        screenshot(page, "mlflow-ui/dpo-run-curves")


def test_forced_repro_rebuilds_byte_identical_outputs(project):
    """Every cached DVC output is a pure function of its inputs and params: rerunning every
    stage on the same inputs gives the md5s dvc.lock already records (timings live in the
    uncached metrics files and in MLflow). The stages run forked from a warm stage server, as
    in `rlhf run`: the outputs it checks were made by `rlhf run`, and `dvc exp run` above
    runs stages cold."""
    from rlhf_core.orchestration.warm_stages import StageServer

    root, env = project

    def cached_outputs() -> dict[str, str]:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        dvc_file = yaml.safe_load((root / "dvc.yaml").read_text())
        uncached = _uncached_paths(dvc_file)
        return {
            f"{stage}:{out['path']}": out["md5"]
            for stage, body in lock["stages"].items()
            for out in body.get("outs", [])
            if out["path"] not in uncached
        }

    before = cached_outputs()
    assert len(before) >= 8
    server = StageServer(root)
    try:
        warm = server.environment()
        assert warm, "the warm stage server did not start"
        _run(["dvc", "repro", "--force"], root, {**env, **warm})
    finally:
        server.stop()
    assert cached_outputs() == before


def _uncached_paths(dvc_file: dict) -> set[str]:
    """Paths of the metrics and plots dvc.yaml declares with `cache: false` (foreach stages
    expanded over policy.algorithms as `${item}`)."""
    paths: set[str] = set()
    for body in dvc_file["stages"].values():
        body = body.get("do", body)
        for entry in (body.get("metrics") or []) + (body.get("plots") or []):
            for path, options in entry.items() if isinstance(entry, dict) else [(entry, {})]:
                if not (options or {}).get("cache", True):
                    paths.update(path.replace("${item}", name) for name in ("dpo", "ppo"))
    return paths


# The sweep runs last: the project's SFT and reward model are built and current, as after
# `make demo`, so the sweep trains only its points' policies. Its β differs from the
# workspace's (0.3, from the pipeline test above), which DVC would find up to date.
TINY_SWEEP = {
    "dpo_betas": [0.2],
    "ppo_target_kls": [2],
    "best_of_n": [1, 2],
    "eval_prompts": 4,
    "queue": True,
    "jobs": 1,
}


def _rlhf_sweep(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["rlhf", "sweep"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )


def _commit(root: Path, env: dict[str, str], message: str) -> None:
    _run(["git", "add", "-A"], root, env)
    identity = ["-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    _run(["git", *identity, "commit", "-qm", message], root, env)


def test_a_sweep_runs_through_dvcs_queue_and_writes_the_frontier(project):
    import numpy as np
    from mlflow import MlflowClient

    from rlhf_core.tracking.experiment import experiment_name, tracking_uri

    root, env = project
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name(experiment_name())

    def runs_of(stage: str) -> int:
        filter_string = f"tags.stage = '{stage}'"
        return len(client.search_runs([experiment.experiment_id], filter_string=filter_string))

    before = {stage: runs_of(stage) for stage in ("sft", "reward", "dpo", "ppo", "evaluate")}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"] = TINY_SWEEP
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _commit(root, env, "a tiny sweep")
    started = time.perf_counter()
    done = _rlhf_sweep(root, env)
    print(f"tiny sweep: {time.perf_counter() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("] queued ") == 2 and done.stdout.count("] running ") == 2

    rows = json.loads((root / "artifacts" / "plots" / "frontier.json").read_text())
    found = sorted((row["method"], row["value"]) for row in rows)
    points = [("best_of_n", 1.0), ("best_of_n", 2.0), ("dpo", 0.2), ("ppo", 2.0)]
    assert found == points
    for row in rows:
        for kind in ("gold", "rm"):
            low, mean, high = (row[f"{kind}_score_{key}"] for key in ("ci_low", "mean", "ci_high"))
            assert low <= mean <= high, row
        assert row["experiment"].startswith("sweep-")
        if row["method"] == "best_of_n":
            assert row["kl_to_sft"] == pytest.approx(np.log(row["value"]) - 1 + 1 / row["value"])
        else:
            assert row["kl_to_sft_stderr"] is not None
    markdown = (root / "artifacts" / "sweep" / "frontier.md").read_text()
    assert "4 held-out prompts" in markdown and "DPO's" in markdown and "PPO's" in markdown
    assert (root / "artifacts" / "plots" / "frontier.png").stat().st_size > 10_000

    (sweep_run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.stage = 'sweep'"
    )
    assert sweep_run.info.run_name == "sweep" and sweep_run.info.status == "FINISHED"
    assert any(key.startswith("verdict.gold.dpo_vs_ppo") for key in sweep_run.data.tags)
    children = client.search_runs(
        [experiment.experiment_id], filter_string="tags.stage = 'sweep_point'"
    )
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {sweep_run.info.run_id}
    logged = sorted((c.data.params["method"], float(c.data.params["value"])) for c in children)
    assert logged == points
    for child in children:
        assert {"kl_to_sft", "rm_score_mean", "rm_score_ci_low", "gold_score_ci_high"} <= set(
            child.data.metrics
        )
    artifacts = {item.path for item in client.list_artifacts(sweep_run.info.run_id, "sweep")}
    assert {"sweep/frontier.png", "sweep/frontier.json", "sweep/frontier.md"} <= artifacts

    # The experiments' stages logged to the project's store (not their temporary folders'):
    # each point trained its own policy; SFT and the reward model did not train again.
    after = {stage: runs_of(stage) for stage in before}
    assert {stage: after[stage] - before[stage] for stage in ("sft", "reward", "dpo", "ppo")} == {
        "sft": 0,
        "reward": 0,
        "dpo": 1,
        "ppo": 1,
    }
    log = next((root / "artifacts" / "sweep" / "logs").glob("sweep-*.log")).read_text()
    assert log.count("Reproducing experiment '") == 2
    assert "Running stage 'sft'" not in log and "Running stage 'reward'" not in log
    # An evaluation whose inputs another point already evaluated comes from DVC's run-cache.
    evaluated = log.count("Running stage 'evaluate'")
    assert evaluated + log.count("Stage 'evaluate' is cached") == 2
    assert after["evaluate"] - before["evaluate"] == evaluated

    # The sweep's points are DVC experiments: one of them goes into the workspace, and
    # `dvc metrics diff` shows what it changed against the commit.
    dpo_point = next(row["experiment"] for row in rows if row["method"] == "dpo")
    assert dpo_point in _run(["dvc", "exp", "show", "--json"], root, env)
    _run(["dvc", "exp", "apply", dpo_point], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["policy"]["dpo"]["beta"] == 0.2
    assert "artifacts/metrics/dpo.json" in _run(["dvc", "metrics", "diff"], root, env)

    # A point whose policy stage fails, run without the queue (`dvc exp run --temp`): the
    # sweep names the experiment and its log.
    params["sweep"] = {**TINY_SWEEP, "dpo_betas": [0.3], "ppo_target_kls": [], "queue": False}
    params["policy"]["dpo"]["lora"] = {"enabled": True, "target_modules": ["no_such_layer"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _commit(root, env, "a LoRA on a layer the model does not have")
    failed = _rlhf_sweep(root, env)
    assert failed.returncode == 2
    (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert (
        "1 of 1 sweep experiments failed: sweep-" in error
        and "-dpo-beta-0.3 (failed, log " in error
    )
    log_path = Path(error.split(", log ")[1].split(")")[0])
    assert "no_such_layer" in log_path.read_text()
