"""A team's first retrain on real servers, end to end: `rlhf infra up` (PostgreSQL, the S3
emulator, MLflow with basic auth, Prefect, a worker; `status`, and `up` again keeping all of
it), `rlhf
deploy` (a pool deployment with no machine's path in it), an `rlhf ingest` whose event has the
worker run the retrain in its checkout: the tiny pipeline against the servers, to completion,
promoting the first champion; then
what the team sees: MLflow's nested runs, metric histories, artifacts in the bucket and the
champion with its lineage, a request without the login refused, no secret in any param or
tag; the results pushed to the DVC
remote and dvc.lock committed, a fresh clone that pulls them with a clean `dvc status`; and
`rlhf infra down` leaving no process and no port behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import free_port

from benchmarks.pipeline import project_environment, scratch_project
from benchmarks.settings import QUICK_PIPELINE_PARAMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DVC_BUCKET = "team-dvc"


def run(argv, cwd, env, timeout=600):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def stack_dir():
    folder = Path(tempfile.mkdtemp(prefix="rlhf-team-"))  # reachable by the postgres user
    folder.chmod(0o755)
    yield folder
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    subprocess.run([rlhf, "infra", "down", "--dir", str(folder), "--purge"], timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_team_retrain_on_the_stack(tmp_path, stack_dir, monkeypatch):
    started = time.monotonic()
    # DPO alone: what a team's stack changes is where runs, files and flows go, not PPO
    # (which the end-to-end tests run).
    policy = {**QUICK_PIPELINE_PARAMS["policy"], "algorithms": ["dpo"]}
    params = {
        **QUICK_PIPELINE_PARAMS,
        "policy": policy,
        "orchestration": {"record_lock": "commit"},
    }
    project = scratch_project(REPO, tmp_path / "teamproj", params)
    base_env = project_environment(project)
    for key, value in (("user.email", "team@example.org"), ("user.name", "team")):
        run(["git", "config", key, value], project, base_env)
    rlhf = str(Path(sys.executable).with_name("rlhf"))

    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    up = run(
        [
            rlhf,
            "infra",
            "up",
            "--dir",
            str(stack_dir),
            "--project",
            str(project),
            "--no-ui",
            *flags,
        ],
        project,
        base_env,
    )
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in up.splitlines()
        if line.startswith("export ")
    )
    # MLflow's login: made by `up`, owner-only, loaded from the file, never printed.
    credentials = stack_dir / "credentials.env"
    assert f"set -a; . {credentials}; set +a" in up
    assert credentials.stat().st_mode & 0o777 == 0o600
    login = dict(line.split("=", 1) for line in credentials.read_text().splitlines())
    assert login["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert len(login["MLFLOW_TRACKING_PASSWORD"]) >= 24
    assert login["MLFLOW_TRACKING_PASSWORD"] not in up
    env = {**base_env, **exports, **login}
    for name, value in login.items():  # for this process's MLflow client
        monkeypatch.setenv(name, value)
    stack_up_s = time.monotonic() - started
    _check_status_and_up_again(rlhf, stack_dir, flags, project, env)

    # The team's DVC remote: a bucket of the stack's S3 store.
    s3 = _s3_client(exports)
    s3.create_bucket(Bucket=DVC_BUCKET)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "add", "-d", "team", f"s3://{DVC_BUCKET}/cache"], project, env)
    endpoint = exports["MLFLOW_S3_ENDPOINT_URL"]
    run([*dvc, "remote", "modify", "team", "endpointurl", endpoint], project, env)
    run(["git", "commit", "-qam", "the team's DVC remote"], project, env)

    run([rlhf, "deploy", "--project", str(project)], project, env)
    _check_deployment(exports["PREFECT_API_URL"], tmp_path)

    # New preferences, ingested: the event has the worker run the retrain deployment.
    batch = tmp_path / "batch.jsonl"
    rows = [
        {
            "prompt": f"Write a short review of Film T{i}, a drama.",
            "chosen": f"Film T{i} was a wonderful and moving drama. I loved the acting.",
            "rejected": f"Film T{i} was a dull drama. The acting was poor.",
        }
        for i in range(12)
    ]
    batch.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ingested = run([rlhf, "ingest", str(batch)], project, env)
    assert "sent event rlhf.preferences.ingested" in ingested
    flow_run = _wait_for_retrain(exports["PREFECT_API_URL"], stack_dir / "logs" / "worker.log")
    assert flow_run["state_type"] == "COMPLETED", flow_run

    _check_mlflow(exports, login["MLFLOW_TRACKING_PASSWORD"])
    _check_dvc_round_trip(project, tmp_path / "clone", env)

    pids = [
        s["pid"]
        for s in json.loads((stack_dir / "stack.json").read_text())["services"].values()
        if s["pid"]
    ]
    down_started = time.monotonic()
    down = run([rlhf, "infra", "down", "--dir", str(stack_dir)], project, env)
    stack_down_s = time.monotonic() - down_started
    assert down.splitlines() == [
        f"{name}: stopped" for name in ("worker", "prefect", "mlflow", "s3", "postgres")
    ]
    for pid in pids:  # exited; init may take seconds to collect the zombies, none runs
        assert _running_members(pid) == [], pid
    assert not any(_port_answers(port) for port in ports.values())
    # A figure, not a bound (timings belong to benchmarks).
    print(
        f"stack up {stack_up_s:.0f} s; down {stack_down_s:.1f} s; "
        f"whole test {time.monotonic() - started:.0f} s"
    )


def _s3_client(exports: dict[str, str]):
    """A boto3 client of the stack's S3 store, with the credentials `up` exported."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=exports["MLFLOW_S3_ENDPOINT_URL"],
        region_name=exports["AWS_DEFAULT_REGION"],
        aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
    )


def _running_members(pgid: int) -> list[int]:
    """The pids of the processes of group `pgid` that are not zombies."""
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _port_answers(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _check_status_and_up_again(rlhf, stack_dir, flags, project, env) -> None:
    """`status` says what runs where; `up` again keeps all of it."""
    status = run([rlhf, "infra", "status", "--dir", str(stack_dir)], project, env)
    rows = [line.split()[:2] for line in status.splitlines()]
    assert rows == [[name, "up"] for name in ("postgres", "s3", "mlflow", "prefect", "worker")]
    again = run([rlhf, "infra", "up", "--dir", str(stack_dir), "--no-ui", *flags], project, env)
    assert again.count("already running") == 5


def _check_deployment(api_url: str, tmp_path: Path) -> None:
    """What the server holds of `rlhf deploy`: a pool deployment that enters the worker's
    checkout and matches the project's name, with no machine's path in it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: api_url})
    with settings, get_client(sync_client=True) as client:  # the client reads the settings
        deployment = client.read_deployment_by_name("rlhf-retrain/retrain-teamproj")
        [automation] = client.read_automations_by_name(
            "rlhf retrain of project teamproj on new preference data"
        )
    assert deployment.work_pool_name == "rlhf"
    assert deployment.entrypoint == "flows/retrain.py:retrain"
    assert deployment.parameters == {"project_root": "."}
    assert deployment.pull_steps == [
        {"rlhf_core.app.worker_project.enter_project": {"directory": "{{ $RLHF_PROJECT_ROOT }}"}}
    ]
    assert deployment.global_concurrency_limit.limit == 1
    assert automation.trigger.match.model_dump() == {
        "prefect.resource.id": "rlhf.preferences.*",
        "rlhf.project": "teamproj",
    }
    assert str(tmp_path) not in deployment.model_dump_json() + automation.model_dump_json()


def _wait_for_retrain(api_url: str, worker_log: Path, timeout_s: float = 240) -> dict:
    """The retrain deployment's flow run, once it reaches a final state."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    body = json.dumps({"flows": {"name": {"any_": ["rlhf-retrain"]}}}).encode()
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api_url}/flow_runs/filter",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)
        final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if final:
            return final[0]
        time.sleep(3)
    raise AssertionError(
        f"no retrain finished in {timeout_s:.0f} s; worker log:\n{worker_log.read_text()[-4000:]}"
    )


def _check_mlflow(exports: dict[str, str], password: str) -> None:
    """Through the MLflow server: a request without the login refused; the retrain's pipeline
    run with nested stage runs, a curve of several steps, artifacts in the S3 bucket, and the
    champion with its lineage; neither secret in any run's params or tags."""
    import urllib.error
    import urllib.request

    from mlflow import MlflowClient

    search = f"{exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=5"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401

    from rlhf_core.tracking.registry import CHAMPION, POLICY_MODEL
    from rlhf_core.tracking.registry_lineage import version_lineage

    client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = {run.info.run_id for run in runs if "mlflow.parentRunId" not in run.data.tags}
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") in parents]
    assert parents and {r.data.tags.get("stage") for r in nested} >= {
        "sft",
        "reward",
    }
    sft = next(r for r in nested if r.data.tags.get("stage") == "sft")
    curves = {key: client.get_metric_history(sft.info.run_id, key) for key in sft.data.metrics}
    longest = max(curves.values(), key=len)
    assert len(longest) > 1 and [m.step for m in longest] == sorted(m.step for m in longest)
    s3 = _s3_client(exports)
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow-artifacts")
        for item in page.get("Contents", [])
    ]
    assert any(key.endswith(".safetensors") for key in keys)
    # The S3 secret and MLflow's password were in every process's environment; no run
    # records them.
    for run_data in (run.data for run in runs):
        recorded = json.dumps({**run_data.params, **run_data.tags})
        assert exports["AWS_SECRET_ACCESS_KEY"] not in recorded and password not in recorded
    champion = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION)
    assert champion.run_id in {run.info.run_id for run in runs}
    assert champion.tags["lineage"].startswith(f"runs:/{champion.run_id}/")
    lineage = version_lineage(client, champion)  # down to the data's md5s
    assert lineage["data"]["data/validated/preference"], lineage


def _check_dvc_round_trip(project: Path, clone: Path, env: dict[str, str]) -> None:
    """The worker committed dvc.lock and pushed; a fresh clone pulls a clean project."""
    log = run(["git", "log", "--format=%s"], project, env).splitlines()
    assert log[0].startswith("rlhf retrain: Retrained on"), log[:3]
    run(["git", "clone", "-q", str(project), str(clone)], clone.parent, env)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "pull"], clone, env)
    status = run([*dvc, "status", "--json"], clone, env)
    assert json.loads(status) == {}, status
