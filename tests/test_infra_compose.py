"""infra/docker-compose.yml, checked without a Docker engine: `docker-compose config` (Debian's
docker-compose, installed by infra/scripts/install-test-packages.sh) validates and resolves it,
and the resolved file is cross-checked with infra/.env.example, infra/README.md, the images'
Dockerfiles and pyproject.toml's pins."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
LONG_RUNNING = {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"}
CLIENT_VARIABLES = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
    "PREFECT_UI_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
]


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: run infra/scripts/install-test-packages.sh"
    argv = [binary, "--env-file", str(env_file), "-f", str(COMPOSE), "config"]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def resolved() -> dict:
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return dict(pairs)


def pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==([^";]+)"', text))


def test_the_stack_resolves_with_the_example_env_and_has_every_service(resolved):
    services = resolved["services"]
    assert set(services) == LONG_RUNNING | {"minio-buckets"}
    for name in LONG_RUNNING - {"prefect-worker"}:
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():  # start order waits on health, not on start
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition["condition"] in {
                "service_healthy",
                "service_completed_successfully",
            }, (name, dependency)


def test_published_ports_are_on_loopback_by_default(resolved):
    published = [
        port for service in resolved["services"].values() for port in service.get("ports", [])
    ]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published)


def test_a_missing_password_stops_compose_with_its_name(tmp_path):
    env = {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    done = compose_config(env_file)
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD in infra/.env" in done.stderr


def test_every_variable_is_in_the_env_example_and_documented():
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    example = env_example()
    assert used == set(example), "compose and .env.example name different variables"
    readme = (INFRA / "README.md").read_text()
    for name in sorted(set(example) | set(CLIENT_VARIABLES)):
        assert f"`{name}`" in readme, f"{name} is not documented in infra/README.md"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/.env (the passwords) must be git-ignored"


def test_the_services_run_the_versions_the_project_pins(resolved):
    pinned = pins()
    services = resolved["services"]
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{pinned['prefect']}-")
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    for package in ("mlflow", "psycopg2-binary", "boto3", "botocore", "flask-wtf"):
        assert f"{package}=={pinned[package]}" in dockerfile, package
    assert services["mlflow"]["image"] == f"rlhf-mlflow:{pinned['mlflow']}"
    # The worker installs this project, so its pins are pyproject.toml's by construction.
    worker = (INFRA / "worker" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -e '.[server,s3,lora]'" in worker


def test_the_servers_get_their_backends_and_the_worker_its_clients(resolved):
    services = resolved["services"]
    example = env_example()
    mlflow_command = " ".join(services["mlflow"]["command"])
    assert "--app-name=basic-auth" in mlflow_command
    assert "--backend-store-uri=postgresql://" in mlflow_command
    assert f"--artifacts-destination=s3://{example['MLFLOW_BUCKET']}/" in mlflow_command
    assert "mlflow:5000" in mlflow_command  # the worker's Host header passes the guard
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["MLFLOW_TRACKING_PASSWORD"] == example["MLFLOW_TRACKING_PASSWORD"]
    assert "--pool" in services["prefect-worker"]["command"]
    initdb = (INFRA / "postgres" / "init-databases.sql").read_text()
    assert "CREATE DATABASE mlflow;" in initdb and "CREATE DATABASE prefect;" in initdb
