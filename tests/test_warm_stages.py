"""The warm stage server: `rlhf stage` commands run in forks of one pre-imported process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_core.orchestration import warm_stages
from rlhf_core.orchestration.warm_stages import SOCKET_ENV, StageServer, delegate
from rlhf_core.orchestration.warm_stages import warm_stages as warm

RLHF = str(Path(sys.executable).parent / "rlhf")
LIGHT_PRELOAD = (
    "rlhf_core.orchestration.stage_commands",
)  # the tests need the mechanism, not the heavy imports


@pytest.fixture
def server(tmp_path):
    server = StageServer(tmp_path, modules=LIGHT_PRELOAD)
    yield server
    server.stop()


def _client(args, cwd, env_extra, timeout=120):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [RLHF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_stage_commands_run_in_the_server_with_the_callers_cwd_env_and_streams(server, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = server.environment()
    assert set(env) == {SOCKET_ENV} and os.path.exists(env[SOCKET_ENV])

    missing = _client(["stage", "sft", "--params", "absent.yaml"], project, env)
    # The child reports on the client's stderr and its exit code comes back.
    assert missing.returncode == 2
    assert "absent.yaml: file not found" in missing.stderr

    helped = _client(["stage", "--help"], project, env)
    assert helped.returncode == 0
    assert "Run one pipeline stage" in helped.stdout


def test_the_child_sees_the_callers_cwd_and_environment(server, tmp_path):
    path = server.environment()[SOCKET_ENV]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": "not a number"}))
    script = (
        "import os, sys\n"
        "from rlhf_core.orchestration.warm_stages import delegate\n"
        "raise SystemExit(delegate(['stage', 'sft']))\n"
    )
    env = {**os.environ, SOCKET_ENV: path, "RLHF_TEST_MARKER": "from-the-client"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    # `rlhf stage sft` read params.yaml from the client's folder, not the server's.
    assert done.returncode != 0
    assert "seed" in done.stderr + done.stdout


def test_the_server_runs_stage_commands_only(server, tmp_path):
    script = (
        "from rlhf_core.orchestration.warm_stages import delegate\n"
        "raise SystemExit(delegate(['version']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, **server.environment()},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "runs `rlhf stage`, not `rlhf version`" in done.stderr


def test_server_serves_many_requests(server, tmp_path):
    env = server.environment()
    for _ in range(3):
        done = _client(["stage", "--help"], tmp_path, env)
        assert done.returncode == 0
    assert server._process.poll() is None  # still serving after three stages


def test_without_a_server_the_command_runs_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    assert delegate(["stage", "--help"]) is None
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "nobody-listens.sock"))
    assert delegate(["stage", "--help"]) is None
    done = _client(["stage", "--help"], tmp_path, {SOCKET_ENV: str(tmp_path / "gone.sock")})
    assert done.returncode == 0 and "Run one pipeline stage" in done.stdout


def test_a_client_that_hangs_up_gets_its_child_stopped():
    parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # a stage that would run for a minute
        parent.close()
        child_end.close()
        time.sleep(60)
        os._exit(0)
    child_end.close()  # the client goes away
    started = time.monotonic()
    code = warm_stages._wait_for_child(pid, parent)
    parent.close()
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5


def test_exit_codes_of_signals_follow_the_shell_convention():
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    assert warm_stages._exit_code(os.waitpid(pid, 0)[1]) == 128 + signal.SIGKILL


def test_the_context_routes_stage_environments_and_stops_the_server(tmp_path):
    assert warm_stages.stage_server_environment() == {}
    with warm(tmp_path) as active:
        active.modules = LIGHT_PRELOAD
        env = warm_stages.stage_server_environment()
        path = env[SOCKET_ENV]
        assert os.path.exists(path)
        process = active._process
    assert process.poll() is not None  # stopped
    assert not os.path.exists(path)
    assert warm_stages.stage_server_environment() == {}


def test_a_stopped_server_exits_at_once_without_interpreter_teardown(tmp_path):
    """SIGTERM ends the server with exit code 0 and without running exit handlers: it saves
    nothing, and tearing down torch and MLflow cost every pipeline run ~1.5 s at its end."""
    imported, torn_down = tmp_path / "imported", tmp_path / "torn_down"
    (tmp_path / "teardown_probe.py").write_text(
        "import atexit, pathlib\n"
        f"atexit.register(pathlib.Path({str(torn_down)!r}).touch)\n"
        f"pathlib.Path({str(imported)!r}).touch()\n"
    )
    server = StageServer(tmp_path, modules=("teardown_probe",))
    assert server.start()
    process = server._process
    deadline = time.monotonic() + 60
    while not imported.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    server.stop()
    assert process.returncode == 0
    assert not torn_down.exists()
