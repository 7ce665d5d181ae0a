"""The retrain deployment on a work pool (`rlhf deploy`): no path baked in, a worker runs it
in the checkout its environment names, triggered by an ingest event of the project's name
from any path. Against a real Prefect server and a real `prefect worker` process."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import prefect_server, server_env, start_process, stop_process_group
from toy_project import build_toy_project

from rlhf_core.app.worker_project import (
    PROJECT_ROOT_VARIABLE,
    ProjectNotFoundError,
    enter_project,
)
from rlhf_core.data.store import IngestResult
from rlhf_core.orchestration import store_versioning

REPO = Path(__file__).resolve().parents[1]
POOL = "team-pool"


def test_enter_project_moves_into_the_checkout_the_worker_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "checkout"
    project.mkdir()
    monkeypatch.delenv(PROJECT_ROOT_VARIABLE, raising=False)
    with pytest.raises(ProjectNotFoundError, match=f"{PROJECT_ROOT_VARIABLE} is not set"):
        enter_project("")
    with pytest.raises(ProjectNotFoundError, match=r"no dvc\.yaml or params\.yaml there"):
        enter_project(str(project))
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params.yaml").write_text("seed: 0\n")
    monkeypatch.setenv(PROJECT_ROOT_VARIABLE, str(project))
    assert enter_project("") == {"directory": str(project.resolve())}  # templated to ""
    assert Path.cwd() == project.resolve()


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as api_url:
        yield api_url


def client_for(api_url):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Client:
        def __enter__(self):
            self.settings = temporary_settings(updates={PREFECT_API_URL: api_url})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Client()


@pytest.mark.slow
def test_deploy_to_a_pool_then_a_worker_runs_it_on_an_ingest_event(tmp_path, prefect_api):
    project = build_toy_project(tmp_path / "teamproj")
    for folder in ("flows", "tasks"):  # a project's checkout holds the flows it deploys
        (project / folder).symlink_to(REPO / folder)
    env = server_env({"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "home")})
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    deployed = subprocess.run(
        [rlhf, "deploy", "--project", str(project), "--pool", POOL],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "Deployed rlhf-retrain/retrain-teamproj to work pool 'team-pool'" in deployed.stdout

    with client_for(prefect_api) as client:
        deployment = client.read_deployment_by_name("rlhf-retrain/retrain-teamproj")
        [automation] = client.read_automations_by_name(
            "rlhf retrain of project teamproj on new preference data"
        )
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/retrain.py:retrain"
    assert deployment.parameters == {"project_root": "."}
    assert deployment.pull_steps == [
        {"rlhf_core.app.worker_project.enter_project": {"directory": "{{ $RLHF_PROJECT_ROOT }}"}}
    ]
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.global_concurrency_limit.limit == 1
    assert automation.trigger.match.model_dump() == {
        "prefect.resource.id": "rlhf.preferences.*",
        "rlhf.project": "teamproj",
    }
    stored = deployment.model_dump_json() + automation.model_dump_json()
    assert str(tmp_path) not in stored  # no machine's path in what the server holds

    # A worker started elsewhere, told only where its checkout is.
    worker_env = {**env, PROJECT_ROOT_VARIABLE: str(project)}
    worker_env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL]
    worker = start_process(
        [*argv, "--type", "process"], worker_env, tmp_path / "worker.log", cwd=tmp_path
    )
    try:
        # The ingest event of a store of this project's name, at another path.
        elsewhere = tmp_path / "other-machine" / "teamproj" / "data" / "preferences"
        elsewhere.mkdir(parents=True)
        added = IngestResult(file="a.jsonl", sha256="ab" * 32, status="ingested", added=3)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
            event = store_versioning.emit_ingested_event(elsewhere, [added], "teamproj")
        assert event.resource["rlhf.project"] == "teamproj"
        run = wait_for_final_run(prefect_api, deployment.id, tmp_path / "worker.log")
    finally:
        stop_process_group(worker)
    assert run.state.type.value == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    log = (tmp_path / "worker.log").read_text()
    assert "No new preference data" in log


def wait_for_final_run(api_url, deployment_id, log_path, timeout_s=240):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with client_for(api_url) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        final = [run for run in runs if run.state and run.state.is_final()]
        if final:
            return final[0]
        time.sleep(2)
    raise AssertionError(
        f"no flow run finished in {timeout_s} s; worker log:\n{log_path.read_text()[-3000:]}"
    )
