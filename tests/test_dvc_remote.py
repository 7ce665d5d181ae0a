"""A DVC remote in object storage: the preference store and a stage output pushed to an S3
emulator (moto) and pulled into a fresh clone, with the `s3` extra's pinned packages."""

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from servers import S3_TEST_CREDENTIALS, s3_server, server_env

from rlhf_core.data.store import ingest_files
from rlhf_core.orchestration.store_versioning import track_store
from rlhf_core.tracking.lineage import path_md5

BUCKET = "rlhf-dvc"


def run(argv, cwd, env=None):
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def dvc(cwd, *args, env=None):
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def git(cwd, *args):
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd)


@pytest.fixture
def remote(tmp_path):
    with s3_server(tmp_path, BUCKET) as endpoint:
        yield endpoint


@pytest.mark.slow
def test_push_to_s3_then_pull_into_a_clone_restores_the_store(tmp_path, remote):
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    (project / ".gitignore").write_text("/data/?*\n!/data/preferences.dvc\n")
    source = project / "batch.jsonl"
    pairs = [
        f'{{"prompt": "Review film {i}.", "chosen": "Film {i} was a joy.", '
        f'"rejected": "Film {i} was dull."}}'
        for i in range(20)
    ]
    source.write_text("\n".join(pairs) + "\n")
    store = project / "data" / "preferences"
    ingest_files([source], store)
    track_store(store)
    # The remote as a team sets it up: URL and endpoint in .dvc/config (committed),
    # credentials only in the environment.
    dvc(project, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc-cache")
    dvc(project, "remote", "modify", "team", "endpointurl", remote)
    git(project, "add", ".gitignore", ".dvc/config", ".dvc/.gitignore", "data/preferences.dvc")
    git(project, "commit", "-qm", "store v1")
    env = server_env(S3_TEST_CREDENTIALS)
    pushed = dvc(project, "push", env=env)
    assert "pushed" in pushed

    s3 = boto3.client("s3", endpoint_url=remote, **_client_credentials())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys and all(key.startswith("dvc-cache/files/md5/") for key in keys)
    assert "rlhf-test-secret" not in (project / ".dvc" / "config").read_text()

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "preferences").exists()
    dvc(clone, "pull", env=env)
    assert path_md5(clone / "data" / "preferences") == path_md5(store)
    assert (clone / "data" / "preferences" / "pairs.parquet").read_bytes() == (
        store / "pairs.parquet"
    ).read_bytes()


@pytest.mark.slow
def test_a_push_without_credentials_fails_with_an_error_naming_them(tmp_path, remote):
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    dvc(project, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc-cache")
    dvc(project, "remote", "modify", "team", "endpointurl", remote)
    (project / "data").mkdir()
    (project / "data" / "x.txt").write_text("x")
    dvc(project, "add", "data/x.txt")
    env = server_env({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    env.pop("AWS_ACCESS_KEY_ID"), env.pop("AWS_SECRET_ACCESS_KEY")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(Path(tmp_path) / "none")
    env["AWS_CONFIG_FILE"] = str(Path(tmp_path) / "none")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "push"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "credentials" in (done.stdout + done.stderr).lower()


def _client_credentials():
    return {
        "region_name": S3_TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        "aws_access_key_id": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.mark.slow
def test_a_retrain_pulls_first_pushes_after_and_commits_the_lock(tmp_path, remote):
    """Machine A retrains (pipeline: the toy DAG through `dvc repro`) and pushes; machine B,
    a fresh clone, pulls the same state (`dvc status` clean), and its retrain merges new rows
    into the team's store, not into an empty one."""
    import json as json_module

    import yaml
    from toy_project import TOY_PARAMS, build_toy_project

    from rlhf_core.data.store import read_table
    from rlhf_core.scripts import load_script

    retrain_module = load_script(Path(__file__).resolve().parents[1] / "flows" / "retrain.py")
    machine_a = build_toy_project(tmp_path / "a" / "teamproj")
    params = {**TOY_PARAMS, "orchestration": {"record_lock": "commit"}}
    (machine_a / "params.yaml").write_text(yaml.safe_dump(params))
    (machine_a / ".gitignore").write_text(
        "mlflow.db\nmlruns/\ncalls.log\n.prefect/\n/out/\n/data/?*\n!/data/preferences.dvc\n"
    )
    dvc(machine_a, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc-cache")
    dvc(machine_a, "remote", "modify", "team", "endpointurl", remote)
    git(machine_a, "add", "-A")
    git(machine_a, "commit", "-qm", "remote")

    def pipeline(project_root, **_):
        dvc(Path(project_root), "repro", env=env)
        return {"gate": {"status": "kept"}}

    venv_bin = str(Path(sys.executable).parent)  # the toy stages run `python`
    env = server_env({**S3_TEST_CREDENTIALS, "PATH": f"{venv_bin}:{os.environ['PATH']}"})
    os_environ_backup = dict(os.environ)
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        retrain_module.pipeline = pipeline
        _write_pairs(machine_a / "data" / "incoming" / "first.jsonl", range(0, 6))
        outcome = retrain_module.retrain.fn(project_root=str(machine_a))
        assert outcome["status"] == "retrained" and outcome["added"] == 6
        pushed, recorded = outcome["shared"]
        assert pushed == "pushed to remote 'team'"
        assert recorded.startswith(
            "committed data/preferences.dvc, dvc.lock, metrics/first.json as "
        )
        assert git(machine_a, "status", "--porcelain", "dvc.lock", "data/preferences.dvc") == ""

        machine_b = tmp_path / "b" / "teamproj"
        git(tmp_path, "clone", "-q", str(machine_a), str(machine_b))
        dvc(machine_b, "pull", env=env)
        status = json_module.loads(dvc(machine_b, "status", "--json", env=env))
        assert status == {}
        _write_pairs(machine_b / "data" / "incoming" / "second.jsonl", range(6, 10))
        (machine_b / "data" / "incoming").mkdir(exist_ok=True)
        second = retrain_module.retrain.fn(project_root=str(machine_b))
        assert second["added"] == 4
        assert len(read_table(machine_b / "data" / "preferences")) == 10  # 6 pulled + 4 new
        assert second["shared"][0] == "pushed to remote 'team'"
    finally:
        os.environ.clear()
        os.environ.update(os_environ_backup)


def _write_pairs(path, numbers):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        f'{{"prompt": "Review film {i}.", "chosen": "Film {i} was a joy to watch.", '
        f'"rejected": "Film {i} was dull."}}'
        for i in numbers
    ]
    path.write_text("\n".join(rows) + "\n")
