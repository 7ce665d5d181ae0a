"""The three servers for real, on loopback: PostgreSQL, the Prefect server and the MLflow server.

- Prefect's scheduler service creates the runs of an interval schedule (it did not with
  SQLAlchemy 2.1: "Can't evaluate bulk DML statement" every loop), on PostgreSQL and SQLite.
- A served deployment (`flow.serve`) runs a flow run to Completed, scheduled by the server.
- MLflow on a PostgreSQL backend: through `mlflow server`, and with
  `MLFLOW_TRACKING_URI=postgresql://…` typed directly (psycopg2, the `server` extra).

One PostgreSQL server for the module, one database per use. The fixtures are reusable from
other test modules: `from test_servers import postgres, prefect_postgres_api  # noqa: F401`.
A missing PostgreSQL is a failure naming infra/scripts/install-test-packages.sh, not a skip.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from uuid import UUID

import pytest
from servers import (
    PostgresServer,
    log_tail,
    mlflow_server,
    postgres_server,
    prefect_database_url,
    prefect_server,
    server_env,
    start_process,
    stop_process_group,
    wait_until,
)

SCHEDULE_WAIT_S = 60  # scheduler loop is 2 s; the first loop runs right after start
SERVED_RUN_WAIT_S = 120  # interval 10 s + runner poll 2 s + a flow-run subprocess start


@dataclass(frozen=True)
class PrefectApi:
    """A running test Prefect server: its API URL and its log (quoted when a test fails)."""

    url: str
    log: Path


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the module; each use creates its own database."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def prefect_postgres_api(postgres, tmp_path_factory) -> Iterator[PrefectApi]:
    """A real Prefect server on its own PostgreSQL database, shared by the module's tests."""
    home = tmp_path_factory.mktemp("prefect-postgres")
    with prefect_server(home, database_url=postgres.create_database("prefect")) as url:
        yield PrefectApi(url, home / "server.log")


@pytest.fixture
def prefect_api(request, tmp_path) -> Iterator[PrefectApi]:
    """The Prefect server for the backend named by the test's parameter: the shared one on
    PostgreSQL, or a fresh one on SQLite (the default backend)."""
    if request.param == "postgresql":
        yield request.getfixturevalue("prefect_postgres_api")
        return
    home = tmp_path / "prefect-sqlite"
    with prefect_server(home) as url:
        yield PrefectApi(url, home / "server.log")


@contextlib.contextmanager
def prefect_client(api: PrefectApi):
    """A synchronous Prefect client pointed at `api` (settings restored afterwards)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: api.url}),
        get_client(sync_client=True) as client,
    ):
        yield client


# ---------------------------------------------------------------------------------------------
# Prefect helpers


def create_interval_deployment(client, flow_name: str, name: str, seconds: int) -> UUID:
    """Register a flow and a deployment of it with an active interval schedule, through the
    API only (no runner, no work pool): any runs it gets come from the server's scheduler."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    flow_id = client.create_flow_from_name(flow_name)
    schedule = IntervalSchedule(interval=timedelta(seconds=seconds))
    return client.create_deployment(
        flow_id=flow_id, name=name, schedules=[DeploymentScheduleCreate(schedule=schedule)]
    )


def deployment_runs(client, deployment_id: UUID, state_type=None) -> list:
    """The flow runs of a deployment, optionally only those in `state_type`."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    run_filter = None
    if state_type is not None:
        state = FlowRunFilterState(type=FlowRunFilterStateType(any_=[state_type]))
        run_filter = FlowRunFilter(state=state)
    deployments = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    return client.read_flow_runs(deployment_filter=deployments, flow_run_filter=run_filter)


def wait_for_runs(client, deployment_id: UUID, timeout_s: float, what: str, **filters) -> list:
    """Poll the API until the deployment has at least one matching flow run; return them."""
    found: list = []

    def any_runs() -> bool:
        found[:] = deployment_runs(client, deployment_id, **filters)
        return bool(found)

    wait_until(any_runs, timeout_s, what, interval_s=1.0)
    return found


def flow_run_messages(client, flow_run_id: UUID) -> list[str]:
    """The log messages the flow run sent to the API."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    return [log.message for log in client.read_logs(log_filter=log_filter)]


# ---------------------------------------------------------------------------------------------
# Prefect: the scheduler service and a served deployment


def test_prefect_database_url_uses_asyncpg_for_postgresql():
    """Prefect's server reaches PostgreSQL through asyncpg only; SQLite URLs pass unchanged."""
    assert prefect_database_url("postgresql://postgres@127.0.0.1:5/db") == (
        "postgresql+asyncpg://postgres@127.0.0.1:5/db"
    )
    assert prefect_database_url("postgresql+psycopg2://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert prefect_database_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


@pytest.mark.slow
@pytest.mark.parametrize("prefect_api", ["postgresql", "sqlite"], indirect=True)
def test_scheduler_creates_runs_of_an_interval_schedule(prefect_api):
    """The server's scheduler service (not the API call) creates Scheduled runs, 10 s apart.

    With SQLAlchemy 2.1 the service fails every loop ("Can't evaluate bulk DML statement") and
    no run ever appears: this test is the guard for the `sqlalchemy==2.0.58` pin."""
    from prefect.client.schemas.objects import StateType

    with prefect_client(prefect_api) as client:
        deployment_id = create_interval_deployment(client, "scheduled-probe", "every-10s", 10)
        try:
            runs = wait_for_runs(
                client, deployment_id, SCHEDULE_WAIT_S, "the scheduler to create flow runs"
            )
        except TimeoutError as error:
            raise AssertionError(
                f"{error}; server log:\n{log_tail(prefect_api.log, 60)}"
            ) from error

    assert all(run.state_type == StateType.SCHEDULED for run in runs), runs
    assert all(run.state_name == "Scheduled" for run in runs), runs
    assert all(run.auto_scheduled for run in runs), "runs must come from the scheduler service"
    starts = sorted(run.expected_start_time for run in runs)
    gaps = {(later - earlier).total_seconds() for earlier, later in pairwise(starts)}
    assert gaps <= {10.0}, f"runs are not 10 s apart: {starts}"


SERVED_FLOW = '''\
"""A trivial flow served on an interval by the test (flow.serve blocks until stopped)."""
from prefect import flow


@flow(log_prints=True)
def served_probe() -> int:
    print("served probe ran")
    return 42


if __name__ == "__main__":
    served_probe.serve(name="every-10s", interval=10)
'''


@contextlib.contextmanager
def serving(flow_file: Path, api: PrefectApi, home: Path, log_path: Path) -> Iterator[None]:
    """`python flow_file` (which calls flow.serve) against `api`, stopped afterwards."""
    env = server_env(
        {
            "PREFECT_API_URL": api.url,
            "PREFECT_HOME": str(home),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        }
    )
    process = start_process([sys.executable, flow_file.name], env, log_path, cwd=flow_file.parent)
    try:
        yield
    finally:
        stop_process_group(process)


@pytest.mark.slow
def test_served_deployment_runs_a_flow_run_to_completed(prefect_postgres_api, tmp_path):
    """A `flow.serve(interval=10)` process gets a run from the server's schedule, executes it
    in a subprocess and reports it Completed, with the flow's own log line."""
    from prefect.client.schemas.objects import StateType

    flow_file = tmp_path / "served_probe.py"
    flow_file.write_text(SERVED_FLOW)
    serve_log = tmp_path / "serve.log"
    api = prefect_postgres_api

    def failure(error: Exception) -> AssertionError:
        return AssertionError(
            f"{error}\nserve log:\n{log_tail(serve_log)}\nserver log:\n{log_tail(api.log)}"
        )

    with serving(flow_file, api, tmp_path / "home", serve_log), prefect_client(api) as client:
        try:
            deployment_id = wait_for_deployment(client, "served-probe/every-10s")
            runs = wait_for_runs(
                client,
                deployment_id,
                SERVED_RUN_WAIT_S,
                "a Completed flow run of the served deployment",
                state_type=StateType.COMPLETED,
            )
            messages = wait_for_log(client, runs[0].id, "served probe ran")
        except TimeoutError as error:
            raise failure(error) from error

    assert runs[0].state_name == "Completed"
    assert runs[0].auto_scheduled
    assert any("served probe ran" in message for message in messages)


def wait_for_deployment(client, name: str, timeout_s: float = 60) -> UUID:
    """Wait until `flow/deployment` exists (the serve process registers it on start)."""
    from prefect.exceptions import ObjectNotFound

    found: list[UUID] = []

    def registered() -> bool:
        try:
            found.append(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            return False
        return True

    wait_until(registered, timeout_s, f"deployment {name!r} to be registered", interval_s=1.0)
    return found[0]


def wait_for_log(client, flow_run_id: UUID, text: str, timeout_s: float = 30) -> list[str]:
    """Wait until the flow run's logs (sent in batches) contain `text`; return them all."""
    messages: list[str] = []

    def logged() -> bool:
        messages[:] = flow_run_messages(client, flow_run_id)
        return any(text in message for message in messages)

    wait_until(logged, timeout_s, f"log line {text!r} of flow run {flow_run_id}")
    return messages


# ---------------------------------------------------------------------------------------------
# MLflow on PostgreSQL


def log_probe_run(client, experiment_name: str) -> str:
    """Log a finished run with a param, a 3-step metric and a text artifact; return its id."""
    experiment_id = client.create_experiment(experiment_name)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "beta", "0.1")
    for step, value in enumerate([0.9, 0.7, 0.5]):
        client.log_metric(run_id, "loss", value, step=step)
    client.log_text(run_id, "probe artifact", "notes/probe.txt")
    client.set_terminated(run_id)
    return run_id


@pytest.mark.slow
def test_mlflow_server_on_postgresql_records_a_run(postgres, tmp_path):
    """`mlflow server` on a PostgreSQL backend stores what MlflowClient logs over HTTP: params,
    metric history and status, read back by a second client; artifacts go to the server's
    artifact store (proxied), not the client's disk."""
    from mlflow.tracking import MlflowClient

    backend = postgres.create_database("mlflow_server")
    artifacts = tmp_path / "artifacts"
    with mlflow_server(backend, artifacts, tmp_path / "mlflow-server.log") as url:
        run_id = log_probe_run(MlflowClient(tracking_uri=url), "server-probe")
        reader = MlflowClient(tracking_uri=url)
        run = reader.get_run(run_id)
        history = reader.get_metric_history(run_id, "loss")

    assert run.info.status == "FINISHED"
    assert run.data.params == {"beta": "0.1"}
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7), (2, 0.5)]
    stored = list(artifacts.rglob("probe.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "probe artifact", stored


DIRECT_CLIENT = '''\
"""Log a run with MLFLOW_TRACKING_URI=postgresql://... from the environment, as a user would."""
import json

import mlflow

mlflow.set_experiment("direct-probe")
with mlflow.start_run() as run:
    mlflow.log_param("beta", "0.1")
    mlflow.log_metric("loss", 0.25)
print(json.dumps({"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}))
'''


@pytest.mark.slow
def test_mlflow_tracking_uri_postgresql_works_from_the_client(postgres, tmp_path):
    """`MLFLOW_TRACKING_URI=postgresql://postgres@127.0.0.1:PORT/db` (no driver in the scheme,
    so SQLAlchemy 2.0 loads psycopg2) logs a run from a fresh process; it reads back here."""
    from mlflow.tracking import MlflowClient

    uri = postgres.create_database("mlflow_direct")
    script = tmp_path / "direct_client.py"
    script.write_text(DIRECT_CLIENT)
    env = server_env({"MLFLOW_TRACKING_URI": uri})
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    logged = json.loads(result.stdout.strip().splitlines()[-1])

    assert logged["tracking_uri"] == uri
    run = MlflowClient(tracking_uri=uri).get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"beta": "0.1"}
    assert run.data.metrics == {"loss": 0.25}


@pytest.mark.slow
def test_no_credential_of_the_tracking_uri_reaches_outputs_or_mlflow(
    postgres, tmp_path, monkeypatch
):
    """A password in MLFLOW_TRACKING_URI (this server trusts loopback, so any password is
    accepted) is in no file a stage writes (run markers are DVC outputs) and in none of its
    run's params or tags; the producer lookup by md5 (after a DVC checkout of an older
    version) still finds the run in that store."""
    from mlflow import MlflowClient

    from rlhf_core.tracking.lineage import _with_credentials, read_producer_run_id
    from rlhf_core.tracking.runs import stage_run

    secret = "s3cr3t-pw"
    uri = postgres.create_database("mlflow_secret").replace("postgres@", f"postgres:{secret}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "artifacts" / "sft"
    versions = {}
    for content in (b"version one", b"version two"):
        with stage_run("sft", project_root=tmp_path, params={"seed": 0}) as run:
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(content)
            run.record_output(out)
        versions[content] = run.run_id
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name.endswith("run_info.json") for path in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    recorded = MlflowClient(uri).get_run(versions[b"version two"]).data
    assert secret not in json.dumps({**recorded.params, **recorded.tags})
    (out / "model.safetensors").write_bytes(b"version one")
    assert read_producer_run_id(out) == versions[b"version one"]
    # The masked store of a marker is the one in use: looked up with its credentials.
    marker = json.loads(next(p for p in written if p.name.endswith("run_info.json")).read_text())
    assert secret not in marker["tracking_uri"] and _with_credentials(marker["tracking_uri"]) == uri
