"""Warm stage processes: heavy libraries imported once per pipeline run, one fork per stage.

DVC runs every stage as its own `rlhf stage X` process, and each would spend seconds
importing torch, transformers and MLflow before doing any work: on the demo pipeline that is
the larger part of the orchestration overhead. While a pipeline flow runs, a *stage server*
(`python -m rlhf_core.orchestration.warm_stages SOCKET`) imports those libraries once, then
serves each `rlhf stage` command by forking a child that runs the command with the caller's
arguments, working directory, environment and standard streams (passed over a Unix socket as
file descriptors, so output streams straight to DVC). The `rlhf` process DVC started waits and
exits with the child's exit code. DVC's behaviour is unchanged: it still decides what is
stale, runs the stage command, hashes the outputs and writes dvc.lock.

    flow ── dvc repro ── rlhf stage sft (client) ──socket──> server ──fork──> child: the stage

Without a server (`dvc repro` by hand, or the server gone) `rlhf stage` runs in its own
process as before. The server only imports before it forks (no torch computation, no MLflow
client, no open files of the project): the situation of PyTorch's DataLoader forking its
workers. If the client goes away (Ctrl-C on DVC), its child is terminated.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SOCKET_ENV = "RLHF_STAGE_SERVER"
# What the stages import, before the first stage is served.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "accelerate",
    "safetensors.torch",
    "pandas",
    "pyarrow.parquet",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.data.pandas_dataset",
    "matplotlib.pyplot",
    "rlhf_core.orchestration.stage_commands",
    "rlhf_core.config",
    "rlhf_core.tracking.runs",
    "rlhf_core.models.loading",
    "rlhf_core.training.loop",
    "rlhf_core.training.rollout",
    "rlhf_core.training.ppo_trainer",
    "rlhf_core.generation",
    "rlhf_core.stages.prepare",
    "rlhf_core.stages.validate",
    "rlhf_core.stages.sft",
    "rlhf_core.stages.reward",
    "rlhf_core.stages.dpo",
    "rlhf_core.stages.ppo",
    "rlhf_core.stages.evaluate",
)
# Imported while the first stage (prepare, which does not need them) runs in its child.
LATE_PRELOAD = ("great_expectations", "rlhf_core.data.expectations")
_EXIT_CODE = struct.Struct("!i")
_MAX_REQUEST = 1 << 20
_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Client: the `rlhf` process DVC starts
# --------------------------------------------------------------------------------------------


def delegate(argv: Sequence[str]) -> int | None:
    """Run `rlhf <argv>` in the stage server named by $RLHF_STAGE_SERVER; its exit code.

    None when there is no server to reach (the caller then runs the command itself).
    """
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    env = {key: value for key, value in os.environ.items() if key != SOCKET_ENV}
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": env}).encode()
    with connection:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        socket.send_fds(connection, [request], [0, 1, 2])
        reply = connection.recv(_EXIT_CODE.size)
    if len(reply) != _EXIT_CODE.size:
        print("error: the warm stage server stopped before the stage finished", file=sys.stderr)
        return 1
    return _EXIT_CODE.unpack(reply)[0]


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import `modules`; returns those that failed (an optional library may be missing)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            failed.append(name)
    return failed


def serve(
    socket_path: str, modules: Sequence[str] = PRELOAD, late_modules: Sequence[str] = ()
) -> None:
    """Listen on `socket_path`, preload `modules`, then serve requests one at a time;
    `late_modules` are imported while the first request's child runs."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(8)  # clients queue here while the imports run
    preload(modules)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    late = list(late_modules)
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                _serve_one(connection, listener, late)
            finally:  # the server is stopping (SIGTERM) mid-stage: stop the stage too
                if _running_child is not None:
                    _stop_child(_running_child)
        late = []


_running_child: int | None = None


def _serve_one(
    connection: socket.socket, listener: socket.socket, late_modules: Sequence[str] = ()
) -> None:
    global _running_child
    message, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 3)
    if len(fds) != 3 or not message:
        for fd in fds:
            os.close(fd)
        return
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:  # the child: becomes the stage process
        listener.close()
        connection.close()
        os._exit(_run_request(request, fds))
    _running_child = pid
    for fd in fds:
        os.close(fd)
    preload(late_modules)  # in the parent, beside the child (the next stage needs them)
    code = _wait_for_child(pid, connection)
    _running_child = None
    try:
        connection.send(_EXIT_CODE.pack(code))
    except OSError as error:  # the client is gone; its child was stopped in _wait_for_child
        log.info("stage client left before its exit code %d was sent: %s", code, error)


def _run_request(request: dict, fds: Sequence[int]) -> int:
    """In the forked child: take over the client's streams, cwd and env; run the command."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["rlhf", *request["argv"]]
    code = 1
    try:
        from rlhf_core.orchestration.stage_commands import stage_app

        command, *args = request["argv"]
        if command != "stage":  # `delegate` sends only `rlhf stage ...`
            raise ValueError(f"the warm stage server runs `rlhf stage`, not `rlhf {command}`")
        stage_app(args=args, prog_name="rlhf stage")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # report like an uncaught exception in a normal process
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or 1
    return code


def _wait_for_child(pid: int, connection: socket.socket) -> int:
    """The child's exit code; terminate it if the client disconnects first."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        readable, _, _ = select.select([connection], [], [], _POLL_SECONDS)
        if readable and not connection.recv(1):  # the client hung up (e.g. Ctrl-C)
            return _stop_child(pid)


def _stop_child(pid: int, grace_seconds: float = 10.0) -> int:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return _exit_code(os.waitpid(pid, 0)[1])


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells do


# --------------------------------------------------------------------------------------------
# Lifecycle: started on demand by the pipeline flow, stopped when it ends
# --------------------------------------------------------------------------------------------


class StageServer:
    """A stage server process, started on the first `environment()` call."""

    def __init__(self, project_root: Path, modules: Sequence[str] = PRELOAD) -> None:
        self.project_root = Path(project_root)
        self.modules = tuple(modules)
        self._folder: str | None = None
        self._process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> str | None:
        return None if self._folder is None else os.path.join(self._folder, "stages.sock")

    def start(self) -> str:
        """Start the server (once) and return its socket path once it is listening."""
        if self._process is not None and self._process.poll() is None:
            return str(self.socket_path)
        self._folder = tempfile.mkdtemp(prefix="rlhf-stages-")
        path = str(self.socket_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(SOCKET_ENV, None)
        named = [] if self.modules == PRELOAD else list(self.modules)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rlhf_core.orchestration.warm_stages", path, *named],
            cwd=self.project_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30.0
        while not os.path.exists(path):  # bound before the imports start: quick
            if self._process.poll() is not None or time.monotonic() > deadline:
                log.warning("the warm stage server did not start; stages run cold")
                return ""
            time.sleep(0.02)
        return path

    def environment(self) -> dict[str, str]:
        """Variables that route `rlhf stage` commands to this server (empty if it failed)."""
        path = self.start()
        return {SOCKET_ENV: path} if path else {}

    def stop(self) -> None:
        """Stop the server and remove its socket folder."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._folder is not None:
            for name in os.listdir(self._folder):
                os.unlink(os.path.join(self._folder, name))
            os.rmdir(self._folder)
            self._folder = None


_current: StageServer | None = None


@contextmanager
def warm_stages(project_root: Path) -> Iterator[StageServer]:
    """Within the block, `stage_server_environment()` routes stages to a warm server.

    Nested inside another `warm_stages` block, it yields that block's server (which the
    outer block stops), so a caller can start the server before the flow that uses it.
    """
    global _current
    if _current is not None:
        yield _current
        return
    _current = StageServer(project_root)
    try:
        yield _current
    finally:
        _current.stop()
        _current = None


def stage_server_environment() -> dict[str, str]:
    """The variables for a stage process: the active warm server's socket, or nothing."""
    return {} if _current is None else _current.environment()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m rlhf_core.orchestration.warm_stages SOCKET [MODULE ...]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m rlhf_core.orchestration.warm_stages SOCKET [MODULE ...]")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if len(args) > 1:  # the modules to preload were named
            serve(args[0], args[1:])
        else:
            serve(args[0], PRELOAD, LATE_PRELOAD)
    except SystemExit:
        # Stopped (SIGTERM; a running stage was stopped by serve's own `finally`): the server
        # holds no files or state to save, and tearing down torch, MLflow and the rest took
        # ~1.5 s at the end of every pipeline run. Exit at once, without interpreter teardown.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
