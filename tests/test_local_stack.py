"""`rlhf infra up` refuses a taken port before starting anything. Up, status, use and down of
the real servers are tested on the team stack (tests/test_team_stack.py)."""

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


@pytest.fixture
def stack_dir():
    # Under /tmp, not pytest's root-private folders: as root, PostgreSQL runs as `postgres`,
    # which must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="rlhf-stack-"))
    folder.chmod(0o755)
    yield folder
    rlhf("infra", "down", "--dir", str(folder), "--purge")
    shutil.rmtree(folder, ignore_errors=True)


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
