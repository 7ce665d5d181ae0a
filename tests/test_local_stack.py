"""`rlhf infra up | status | down`: the real servers on loopback, started, checked, used
(an MLflow run whose artifact lands in the S3 emulator; a worker online in its pool) and
stopped, exactly what `up` started and nothing else."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from servers import free_port

RLHF = [str(Path(sys.executable).with_name("rlhf"))]


def rlhf(*args, timeout=400):
    env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout, env=env)


def port_free(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not use
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def stack_dir():
    # Under /tmp, not pytest's root-private folders: as root, PostgreSQL runs as `postgres`,
    # which must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="rlhf-stack-"))
    folder.chmod(0o755)
    yield folder
    rlhf("infra", "down", "--dir", str(folder), "--purge")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_up_status_use_and_down(stack_dir):
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    up = rlhf("infra", "up", "--dir", str(stack_dir), *flags, "--no-ui")
    assert up.returncode == 0, up.stdout + up.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in up.stdout.splitlines()
        if line.startswith("export ")
    )
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"

    status = rlhf("infra", "status", "--dir", str(stack_dir))
    assert status.returncode == 0, status.stdout
    rows = [line.split() for line in status.stdout.splitlines()]
    assert [(row[0], row[1]) for row in rows] == [
        ("postgres", "up"),
        ("s3", "up"),
        ("mlflow", "up"),
        ("prefect", "up"),
        ("worker", "up"),
    ]

    # MLflow's runs go to PostgreSQL, its artifacts to the S3 emulator.
    use = subprocess.run(
        [
            sys.executable,
            "-c",
            USE_MLFLOW,
            exports["MLFLOW_TRACKING_URI"],
            exports["MLFLOW_S3_ENDPOINT_URL"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **exports},
    )
    assert use.returncode == 0, use.stderr
    found = json.loads(use.stdout.splitlines()[-1])
    assert found["artifact_keys"] == [f"artifacts/1/{found['run_id']}/artifacts/note.txt"]
    assert found["metric"] == 0.5

    again = rlhf("infra", "up", "--dir", str(stack_dir), *flags, "--no-ui")
    assert again.returncode == 0 and again.stdout.count("already running") == 5

    state = json.loads((stack_dir / "stack.json").read_text())
    pids = [s["pid"] for s in state["services"].values() if s["pid"]]
    down = rlhf("infra", "down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines() == [
        f"{name}: stopped" for name in ("worker", "prefect", "mlflow", "s3", "postgres")
    ]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert all(port_free(port) for port in ports.values())
    assert rlhf("infra", "status", "--dir", str(stack_dir)).returncode == 3
    # The databases stay for the next `up` (only --purge deletes them).
    assert (stack_dir / "postgres" / "data" / "PG_VERSION").is_file()


def test_a_taken_port_is_one_error_naming_its_flag(stack_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = rlhf(
            "infra",
            "up",
            "--dir",
            str(stack_dir),
            "--mlflow-port",
            str(port),
            "--postgres-port",
            str(free_port()),
            "--s3-port",
            str(free_port()),
            "--prefect-port",
            str(free_port()),
        )
    assert up.returncode == 2
    assert up.stderr.strip() == (
        f"error: port {port} (mlflow) is taken on 127.0.0.1: choose --mlflow-port"
    )
    assert not (stack_dir / "stack.json").exists()


USE_MLFLOW = """
import json, sys, tempfile, pathlib
import boto3, mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("stack-check")
with mlflow.start_run() as run:
    mlflow.log_metric("loss", 0.5)
    note = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    note.write_text("hello")
    mlflow.log_artifact(str(note))
s3 = boto3.client("s3", endpoint_url=sys.argv[2])
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
metric = mlflow.get_run(run.info.run_id).data.metrics["loss"]
print(json.dumps({"run_id": run.info.run_id, "artifact_keys": keys, "metric": metric}))
"""
