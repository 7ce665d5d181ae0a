"""A DVC remote in object storage with the `s3` extra's pinned packages, against an S3
emulator (moto). A retrain's push, commit and a fresh clone's pull are tested on the team
stack (tests/test_team_stack.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
from servers import s3_server, server_env

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
