"""What the `rlhf` CLI needs to start the Prefect flows: find them, configure Prefect, and
start (or find) a Prefect server for schedules and event triggers; and what ingestion needs
around them: version the preference store with `dvc add`, announce new rows.

flows/ and tasks/ are not installed packages: they live in the project's repository and are
loaded by path, the way Prefect itself loads a deployment's entrypoint (`load_entrypoint`,
e.g. "flows/retrain.py:retrain"). A path is looked up in the project root first, then beside
this package (an editable install of this repository), so a project that only holds data and
params can still use the flows that came with the code. Prefect is imported inside functions:
the CLI imports this module for every command. `rlhf run`, `retrain`, `serve` and `ui` first
check that the MLflow tracking store answers (`rlhf_core.tracking_check`).

    rlhf run      -> run_pipeline(root)      the pipeline flow, ephemeral Prefect (no server)
    rlhf serve    -> serve(root, params)     retrain deployments: cron + event trigger
    rlhf ui       -> open_ui(root, port)     the MLflow UI of the project's store: `mlflow ui`
                                             on a local store, the server's own address
    rlhf ingest   -> track_store(store)      version the store with `dvc add` (the retrain
                                             flow calls it too)
                  -> emit_ingested_event()   tell a Prefect server that new data arrived
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rlhf_core.tracking import tracking_uri
from rlhf_core.tracking_check import (
    SERVER_SCHEMES,
    UNCHECKED_SCHEMES,
    check_tracking_store,
    mask_uri,
    store_scheme,
    without_credentials,
)

log = logging.getLogger(__name__)

PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"
DEPLOYMENTS_ENTRYPOINT = "flows/deployments.py:retrain_deployments"
PREFECT_HOME_DIR = ".prefect"  # git-ignored, inside the project
INGESTED_EVENT = "rlhf.preferences.ingested"
DEFAULT_SCHEDULE_CRON = "0 3 * * *"  # every night at 03:00
SERVER_STARTUP_TIMEOUT_S = 180.0
# Prefect's ephemeral server gets 20 s to start by default; a busy 2-core machine needs more.
EPHEMERAL_STARTUP_TIMEOUT_S = "120"
UI_HOST = "127.0.0.1"
UI_STARTUP_TIMEOUT_S = 180.0  # `mlflow ui` answers after about 8 s on an idle 2-core machine
UI_STOP_TIMEOUT_S = 15.0  # it stops in about 3 s (its job runner and huey consumers too)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# --------------------------------------------------------------------------------------------
# Prefect configuration and flow loading
# --------------------------------------------------------------------------------------------


def prefect_defaults(project_root: str | Path) -> dict[str, str]:
    """Environment defaults for Prefect in a project: PREFECT_HOME in `<root>/.prefect`,
    telemetry off, a startup timeout the ephemeral server can meet on a small machine."""
    return {
        "PREFECT_HOME": str(Path(project_root).resolve() / PREFECT_HOME_DIR),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": EPHEMERAL_STARTUP_TIMEOUT_S,
    }


def configure_prefect(project_root: str | Path) -> None:
    """Apply `prefect_defaults` to os.environ where the user has not set them.

    Prefect reads its settings when first imported, so call this before importing it.
    """
    for key, value in prefect_defaults(project_root).items():
        os.environ.setdefault(key, value)


def code_root() -> Path:
    """The repository this package was installed from (it holds flows/ and tasks/)."""
    return Path(__file__).resolve().parents[2]


def resolve_script(path: str | Path, project_root: str | Path = ".") -> Path:
    """An absolute script path as is; a relative one in the project root, else beside the
    package (see the module docstring)."""
    path = Path(path)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(project_root).resolve() / path, code_root() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(f"Cannot find {path} (looked at {tried}); run from the project repository.")


def load_script(path: str | Path, project_root: str | Path = ".") -> ModuleType:
    """The module of a Python file loaded by path (found with `resolve_script`).

    Each file is loaded once per process under a name unique to its absolute path
    (`_rlhf_<stem>_<hash>`), so loading it again returns the same objects, and generic file
    names (tasks, flows) never shadow or collide with installed packages.
    """
    path = resolve_script(path, project_root)
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]
    module_name = f"_rlhf_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a loadable Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_entrypoint(entrypoint: str, project_root: str | Path = ".") -> Any:
    """The object named by a Prefect-style entrypoint "path/to/file.py:name" (`load_script`)."""
    script, separator, name = entrypoint.rpartition(":")
    if not separator or not script.endswith(".py") or not name:
        raise ValueError(f"Entrypoint {entrypoint!r} must look like 'path/to/file.py:name'.")
    module = load_script(script, project_root)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{module.__file__} defines no {name!r}.") from None


# --------------------------------------------------------------------------------------------
# rlhf run
# --------------------------------------------------------------------------------------------


def run_pipeline(project_root: str | Path = ".") -> dict[str, Any]:
    """Run the pipeline flow once and return its summary.

    Prefect runs in ephemeral mode (a temporary local API, no server to start) unless
    PREFECT_API_URL points at a server, which then records the run. A tracking store that
    cannot be reached raises TrackingStoreError before anything starts.
    """
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    pipeline = load_entrypoint(PIPELINE_ENTRYPOINT, root)
    # What is stale, before Prefect starts: when anything is, the warm stage server imports
    # the training libraries while Prefect's temporary server starts (both take seconds).
    from rlhf_core.app.warm_stages import warm_stages

    stale = inspect.getmodule(pipeline.fn).dvc_stage.stale_stages(root)
    with warm_stages(root) as server:
        if stale:
            server.start()
        return pipeline(project_root=str(root), stale=stale)


def run_retrain(project_root: str | Path = ".") -> dict[str, Any]:
    """Run the retrain flow once (ingest data/incoming, reproduce, gate) and return its result.
    A tracking store that cannot be reached raises TrackingStoreError before anything starts."""
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    retrain = load_entrypoint(RETRAIN_ENTRYPOINT, root)
    return retrain(project_root=str(root))


# --------------------------------------------------------------------------------------------
# rlhf serve
# --------------------------------------------------------------------------------------------


def schedule_cron(params: Any) -> str:
    """`orchestration.schedule_cron` of the params, or DEFAULT_SCHEDULE_CRON."""
    section = getattr(params, "orchestration", None)
    cron = getattr(section, "schedule_cron", None)
    return cron or DEFAULT_SCHEDULE_CRON


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def api_is_healthy(api_url: str, timeout_s: float = 5.0) -> bool:
    """Whether `<api_url>/health` answers 200 (a Prefect API, e.g. http://host:4200/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_api(
    api_url: str, process: subprocess.Popen | None, timeout_s: float = SERVER_STARTUP_TIMEOUT_S
) -> None:
    """Poll the API's health until it answers; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api_is_healthy(api_url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"The Prefect server exited with code {process.returncode} before it was "
                "ready; see .prefect/server.log."
            )
        time.sleep(1.0)
    raise RuntimeError(f"The Prefect server at {api_url} was not ready after {timeout_s:.0f} s.")


@contextmanager
def prefect_server(project_root: str | Path) -> Iterator[str]:
    """A Prefect API to use: PREFECT_API_URL when set, in the environment or the Prefect
    profile (it must answer), else a server started here (`prefect server start` on
    127.0.0.1, a free port, PREFECT_HOME in the project, log in .prefect/server.log) and
    stopped on exit. Its UI calls that port's API (`ui_api_env`). Yields the API URL."""
    from prefect.settings import PREFECT_API_URL

    root = Path(project_root).resolve()
    configured = PREFECT_API_URL.value()
    if configured:
        if not api_is_healthy(configured):
            raise ValueError(f"PREFECT_API_URL={configured} does not answer; start that server.")
        print(f"Using the Prefect server at {configured}.", flush=True)
        yield configured
        return
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **prefect_defaults(root), **ui_api_env(api_url)}
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    print(f"Starting a Prefect server on 127.0.0.1:{port} (home {home}) ...", flush=True)
    command = [sys.executable, "-m", "prefect", "server", "start"]
    with open(home / "server.log", "ab") as server_log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process_group ends it all
        )
    try:
        wait_for_api(api_url, process)
        print(f"Prefect server ready: UI at http://127.0.0.1:{port}", flush=True)
        yield api_url
    finally:
        stop_process_group(process)


def ui_api_env(api_url: str) -> dict[str, str]:
    """`PREFECT_UI_API_URL=<api_url>` for a server started here, unless the user set it: on
    any port but 4200 the UI would otherwise call http://127.0.0.1:4200/api."""
    from prefect.settings import get_current_settings

    if "api_url" in get_current_settings().server.ui.model_fields_set:
        return {}
    return {"PREFECT_UI_API_URL": api_url}


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a process started with `start_new_session=True` and everything it started
    (servers fork workers), wait until the whole process group is gone, and SIGKILL whatever
    is left after `timeout_s`. Members outliving their leader are stopped too."""
    if not _signal_group(process, signal.SIGTERM):
        return
    if not _wait_for_group(process, timeout_s):
        _signal_group(process, signal.SIGKILL)
        _wait_for_group(process, timeout_s)


def _signal_group(process: subprocess.Popen, signum: int) -> bool:
    """Send `signum` to the process group led by `process`; False when the group is gone."""
    process.poll()  # reap the leader if it has exited: a zombie still counts as a member
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_for_group(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether every process of `process`'s group ended within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _signal_group(process, 0):  # signal 0 only asks whether the group exists
            return True
        time.sleep(0.1)
    return False


def serve(project_root: str | Path, params: Any) -> None:
    """Serve the retrain deployments (cron schedule + event trigger, one run at a time) until
    interrupted. Blocking; starts a local Prefect server when PREFECT_API_URL is not set.
    A tracking store that cannot be reached raises TrackingStoreError before anything starts."""
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    cron = schedule_cron(params)
    with prefect_server(root) as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # for flow-run subprocesses the runner starts
        from prefect import serve as serve_deployments
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            deployments = load_entrypoint(DEPLOYMENTS_ENTRYPOINT, root)(str(root), cron)
            print(
                f"Serving retrain: cron '{cron}', and on event '{INGESTED_EVENT}'. Ctrl-C stops.",
                flush=True,
            )
            serve_deployments(*deployments)


# --------------------------------------------------------------------------------------------
# rlhf ingest and the retrain flow: version the preference store with `dvc add`
# --------------------------------------------------------------------------------------------


class StoreTrackingError(RuntimeError):
    """`dvc add` of the store failed; the message is one line saying what to do."""


@dataclass(frozen=True)
class StoreTracking:
    """What `track_store` did: `dvc_file` is None when the store is not in a DVC project."""

    dvc_file: Path | None
    changed: bool
    message: str


def dvc_project_root(path: str | Path) -> Path | None:
    """The nearest folder above `path` that holds a `.dvc/` folder (a DVC project), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def track_store(store_dir: str | Path) -> StoreTracking:
    """Version the preference store with `dvc add` in the DVC project that holds it.

    `dvc add` caches the store's content and writes `<store>.dvc` beside it (its md5), so
    `git add` of that file and `dvc push` share the version and `dvc pull` restores it. It is
    idempotent: an unchanged store leaves the .dvc file as it was. A store outside any DVC
    project is skipped (the returned message says so). DVC runs as a subprocess of this
    interpreter, like the pipeline's stages; a failure raises StoreTrackingError.
    """
    store = Path(store_dir).resolve()
    root = dvc_project_root(store)
    if root is None:
        return StoreTracking(
            None,
            False,
            f"{store_dir} is not inside a DVC project (no .dvc/ folder above it): "
            "not tracked with dvc add",
        )
    target = store.relative_to(root).as_posix()
    dvc_file = store.with_name(store.name + ".dvc")
    before = dvc_file.read_text(encoding="utf-8") if dvc_file.is_file() else None
    # --no-relink: the store's files stay plain files. Ingestion appends to manifest.jsonl in
    # place, which would write into the cache through a hardlink or symlink (cache.type).
    # No --quiet: it hides DVC's errors too.
    command = [sys.executable, "-m", "dvc", "add", "--no-relink", target]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=False
        )
    except OSError as error:
        raise StoreTrackingError(f"Cannot run `dvc add {target}`: {error}.") from None
    if done.returncode != 0:
        raise StoreTrackingError(_dvc_add_failure(target, root, done.stdout + done.stderr))
    shown = target if root == Path.cwd().resolve() else f"{target} (in {root})"
    dvc_name = f"{target}.dvc"
    if dvc_file.read_text(encoding="utf-8") == before:
        return StoreTracking(dvc_file, False, f"{shown} is tracked as it is ({dvc_name} unchanged)")
    return StoreTracking(
        dvc_file,
        True,
        f"tracked {shown} with dvc add ({dvc_name}); `git add {dvc_name}` and `dvc push` to "
        "share it",
    )


def _dvc_add_failure(target: str, root: Path, output: str) -> str:
    """One line: DVC's last error, a hint when it is one a user can fix, and the way back."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    reason = (errors or lines or ["no output"])[-1].rstrip(".")
    hint = ""
    if "is git-ignored" in reason:
        # git cannot re-include a file whose folder is ignored, so `/data/` must become `/data/?*`
        folder = target.rpartition("/")[0]
        ignore_contents = f"`/{folder}/?*` (not `/{folder}/`) then " if folder else ""
        hint = f" (let git see it: {ignore_contents}`!/{target}.dvc` in .gitignore)"
    elif "Unable to acquire lock" in reason:
        hint = " (another DVC command, a pipeline run perhaps, holds the project)"
    return (
        f"`dvc add {target}` failed in {root}: {reason}{hint}. The store keeps what was "
        f"ingested; run `dvc add {target}` there once that is fixed."
    )


# --------------------------------------------------------------------------------------------
# rlhf ingest: the event that triggers a retrain
# --------------------------------------------------------------------------------------------


def ingested_resource_id(store_dir: str | Path) -> str:
    """The Prefect resource id of a preference store: `rlhf.preferences.<absolute path>`."""
    return f"rlhf.preferences.{Path(store_dir).resolve()}"


def emit_ingested_event(store_dir: str | Path, results: Sequence[Any]) -> Any:
    """Emit INGESTED_EVENT for a store that gained rows, so a served retrain deployment runs.

    `results` are the store's IngestResults. Nothing is sent (None is returned) when no row
    was added or no Prefect API is configured (PREFECT_API_URL); then there is no server whose
    trigger could react, and starting an ephemeral one would be pointless.
    """
    added = sum(result.added for result in results)
    if added == 0:
        log.debug("No rows added to %s: no event.", store_dir)
        return None
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.debug("No Prefect API configured (PREFECT_API_URL): %s not emitted.", INGESTED_EVENT)
        return None
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        event=INGESTED_EVENT,
        resource={"prefect.resource.id": ingested_resource_id(store_dir)},
        payload={
            "store": str(Path(store_dir).resolve()),
            "added": added,
            "files": [result.file for result in results if result.added],
            "sha256": [result.sha256 for result in results if result.added],
        },
    )
    EventsWorker.drain_all(timeout=30)  # send now: the CLI process is about to exit
    return event


# --------------------------------------------------------------------------------------------
# rlhf ui
# --------------------------------------------------------------------------------------------


class UIError(RuntimeError):
    """`rlhf ui` cannot show the UI; the message is one line, `exit_code` the command's status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While `installed`, SIGINT, SIGTERM and SIGHUP are recorded in `signum` (the first one)
    instead of ending the process, so a blocking command stops its children before it exits.
    The handlers only record: what runs when the signal arrives is never interrupted."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _record(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Record the stop signals inside the block; the previous handlers come back after it."""
        previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def open_ui(project_root: str | Path = ".", port: int = 5000, open_browser: bool = False) -> int:
    """Show the MLflow UI of the project's tracking store and return the command's exit status.

    An MLflow server (http, https) is its own UI: once it answers, print its address (and open
    it in a browser with `open_browser`) and return 0, starting nothing. A local store (sqlite,
    a database server, a file store) gets `mlflow ui` on 127.0.0.1:`port` (`serve_mlflow_ui`).
    Raises TrackingStoreError when the store cannot be reached, UIError when no UI can be shown.
    """
    root = Path(project_root).resolve()
    uri = tracking_uri(root)
    if store_scheme(uri) in UNCHECKED_SCHEMES:
        raise UIError(
            f"{mask_uri(uri)} has its own UI in its workspace; rlhf ui shows a local store or an "
            "MLflow tracking server.",
            exit_code=2,
        )
    check_tracking_store(root)
    if store_scheme(uri) in SERVER_SCHEMES:
        return show_server_ui(uri, open_browser)
    return serve_mlflow_ui(root, port, open_browser)


def experiment_runs_url(address: str, experiment_id: str | None) -> str:
    """The page to open: the experiment's runs table in the UI's model-training view (MLflow
    3.17 opens every experiment in its GenAI view unless the URL says `workflowType`),
    filtered to the pipeline runs (their stage runs nest under them); `address` alone when
    the experiment does not exist yet."""
    if experiment_id is None:
        return address
    query = urllib.parse.urlencode(
        {"workflowType": "machine_learning", "searchFilter": "tags.stage = 'pipeline'"},
        quote_via=urllib.parse.quote,
    )
    return f"{address.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def experiment_id_at(address: str, timeout_s: float = 5.0) -> str | None:
    """Id of the project's experiment (`experiment_name()`) on the MLflow server at
    `address` (REST `experiments/get-by-name`), or None when it does not exist yet."""
    from rlhf_core.tracking import experiment_name

    query = urllib.parse.urlencode({"experiment_name": experiment_name()})
    url = f"{address.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return str(json.load(reply)["experiment"]["experiment_id"])
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None  # no such experiment (404), or a server that wants credentials


def show_server_ui(uri: str, open_browser: bool = False) -> int:
    """Print the address of a tracking server's UI (the server itself, without credentials)
    and open it in a browser with `open_browser`; returns 0."""
    address = experiment_runs_url(
        without_credentials(uri), experiment_id_at(without_credentials(uri))
    )
    print(f"MLflow UI: {address} (the tracking server MLFLOW_TRACKING_URI names).", flush=True)
    if open_browser:
        webbrowser.open(address)
    return 0


def port_in_use(port: int, host: str = UI_HOST) -> bool:
    """Whether something listens on host:port: binding fails with EADDRINUSE as a server's own
    bind would (SO_REUSEADDR set, so a closed connection in TIME_WAIT does not count). Other
    bind errors (a privileged port) are left for the server to report."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def mlflow_ui_command(project_root: str | Path, port: int) -> list[str]:
    """`mlflow ui` on the project's tracking store, bound to 127.0.0.1:<port>."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri(Path(project_root)),
        "--host",
        UI_HOST,
        "--port",
        str(port),
        "--workers",
        "1",  # a local UI for one person; the default 4 workers crowd a small machine
    ]


def serve_mlflow_ui(project_root: str | Path, port: int = 5000, open_browser: bool = False) -> int:
    """Serve `mlflow ui` on the project's store until SIGINT (Ctrl-C), SIGTERM or SIGHUP, then
    stop its whole process group (uvicorn, its job runner and their workers) and return 128 +
    the signal's number, as a shell reports a command a signal ended: 130 for Ctrl-C, 143 for
    SIGTERM, 129 for SIGHUP. Opens the UI in a browser once it answers with `open_browser`.

    Raises UIError when the port is taken (exit status 2) or when `mlflow ui` exits on its own
    (its status, or 1: it exits 0 even when it could not bind the port).
    """
    root = Path(project_root).resolve()
    if port_in_use(port):
        raise UIError(f"port {port} on {UI_HOST} is in use; pass --port", exit_code=2)
    command = mlflow_ui_command(root, port)
    address = f"http://{UI_HOST}:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    print(f"Starting the MLflow UI on {mask_uri(command[5])} at {address} ...", flush=True)
    with StopSignals().installed() as stop:  # before the child exists: no window to orphan it
        process = subprocess.Popen(command, cwd=root, env=env, start_new_session=True)
        try:
            _watch_ui(process, address, stop, open_browser)
        finally:
            stop_process_group(process, UI_STOP_TIMEOUT_S)
    if stop.signum is not None:
        print(f"MLflow UI stopped ({signal.Signals(stop.signum).name}).", flush=True)
        return 128 + stop.signum
    raise _ui_failure(process.returncode, port)


def _watch_ui(
    process: subprocess.Popen, address: str, stop: StopSignals, open_browser: bool
) -> None:
    """Return once a stop signal arrived or `mlflow ui` exited; say when it is ready."""
    if not _wait_for_ui(process, address, stop):
        return
    address = experiment_runs_url(address, experiment_id_at(address))
    print(f"MLflow UI ready: {address}  (Ctrl-C stops it)", flush=True)
    if open_browser:
        webbrowser.open(address)
    while stop.signum is None and process.poll() is None:
        time.sleep(0.2)


def _wait_for_ui(process: subprocess.Popen, address: str, stop: StopSignals) -> bool:
    """Whether the UI answers at `address` before a stop signal or its exit; UIError when it
    has not answered after UI_STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + UI_STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if stop.signum is not None or process.poll() is not None:
            return False
        if api_is_healthy(address, timeout_s=2.0):
            return True
        time.sleep(0.5)
    raise UIError(f"mlflow ui did not answer at {address} within {UI_STARTUP_TIMEOUT_S:.0f} s.")


def _ui_failure(returncode: int | None, port: int) -> UIError:
    """What to say when `mlflow ui` exited on its own (after its group was stopped)."""
    code = returncode or 1
    if port_in_use(port):
        return UIError(f"mlflow ui could not serve: port {port} is in use; pass --port", code)
    return UIError(
        f"mlflow ui exited with status {returncode}; its output above says why.", exit_code=code
    )
