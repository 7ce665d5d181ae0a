"""A tracking server that dies during training never blocks or kills the stage.

Against a real `mlflow server` (tests/servers.py) killed with SIGKILL mid-run: per-step logging
stays fast, metrics wait in the run's spool and reach the server in order when it is back; a
server that never comes back costs the stage no outputs, and the next stage start sends the
spool and ends the run with the outage tag.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import (
    free_port,
    http_ok,
    server_env,
    start_process,
    stop_process_group,
    wait_for_http,
)

from rlhf_core.tracking import runs as tracking_runs
from rlhf_core.tracking.check import mask_uri
from rlhf_core.tracking.experiment import EXPERIMENT_NAME
from rlhf_core.tracking.runs import FLUSH_TIMEOUT_ENV, final_flush_timeout_s, stage_run
from rlhf_core.tracking.spool import OUTAGE_TAG, is_unreachable, read_spool, spool_dir

SERVER_START_S = 120.0


class Server:
    """`mlflow server` on a fixed port and backend, so it can be killed and started again."""

    def __init__(self, folder: Path, backend_db: Path) -> None:
        self.folder = folder
        self.backend = f"sqlite:///{backend_db}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend]
        argv += ["--artifacts-destination", str(self.folder / "artifacts")]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = self.folder / f"server-{self.starts}.log"
        self.process = start_process(argv, server_env(), self.log)
        if wait:
            self.wait()

    def wait(self) -> None:
        wait_for_http(f"{self.uri}/health", self.process, self.log, "mlflow server", SERVER_START_S)

    def kill(self) -> None:
        """SIGKILL the whole server (a crash, the OOM killer), not a clean shutdown."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        assert not http_ok(f"{self.uri}/health")

    def freeze(self, frozen: bool) -> None:
        """SIGSTOP (a hung server: connections open, nothing answers) or SIGCONT it."""
        os.killpg(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a frozen server cannot stop
            stop_process_group(self.process)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, empty_mlflow_db):
    """One real MLflow server for the module (starting one takes seconds to a minute on a
    busy machine), on a migrated sqlite copy."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(empty_mlflow_db, folder / "backend.db")
    running = Server(folder, folder / "backend.db")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def server(module_server, monkeypatch):
    """The module's server, answering (a test before may have killed it); the tracking URI
    points at it."""
    if module_server.process.poll() is not None or not http_ok(f"{module_server.uri}/health"):
        module_server.stop()
        module_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_server.uri)
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("RLHF_EXPERIMENT", raising=False)
    return module_server


@pytest.fixture
def timed_log_metrics(monkeypatch):
    """Seconds each StageRun.log_metrics call took, in call order."""
    seconds: list[float] = []
    original = tracking_runs.StageRun.log_metrics

    def timed(self, metrics, step):
        started = time.perf_counter()
        original(self, metrics, step)
        seconds.append(time.perf_counter() - started)

    monkeypatch.setattr(tracking_runs.StageRun, "log_metrics", timed)
    return seconds


def _messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted_gets_every_metric_in_order(
    server, tmp_path, caplog, timed_log_metrics
):
    """The loop logs 3 metrics a step at ~20 steps/s through a SIGKILL of the server and its
    restart on the same port and backend; every step arrives once, and the run ends
    FINISHED without the outage tag."""
    caplog.set_level(logging.WARNING, logger="rlhf_core.tracking")
    project = tmp_path / "project"
    project.mkdir()
    values = {}

    def log_step(run, step):
        values[step] = 1.0 / (step + 1)
        run.log_metrics({"loss": values[step], "lr": 1e-3, "step_x2": 2.0 * step}, step)
        time.sleep(0.05)

    with stage_run("outage-probe", project_root=project) as run:
        step = 0
        for step in range(100):
            log_step(run, step)
        assert run.flush(timeout_s=30)
        server.kill()
        outage_started = time.monotonic()
        during_outage = len(timed_log_metrics)
        # Train on until the writer has spilled to the spool, then bring the server back
        # while the loop keeps going.
        while not run.spool_path.exists():
            step += 1
            log_step(run, step)
            assert time.monotonic() - outage_started < 60, "no spool after 60 s of outage"
        server.start(wait=False)
        while not http_ok(f"{server.uri}/health"):
            for _ in range(10):
                step += 1
                log_step(run, step)
            assert time.monotonic() - outage_started < SERVER_START_S
        outage_calls = timed_log_metrics[during_outage:]
        for _ in range(40):
            step += 1
            log_step(run, step)

    client = MlflowClient(server.uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert OUTAGE_TAG not in stored.data.tags
    for key, expected in (("loss", values), ("step_x2", {s: 2.0 * s for s in values})):
        history = client.get_metric_history(run.run_id, key)
        assert len(history) == len(values)  # none lost, none twice
        by_time = sorted(history, key=lambda m: (m.timestamp, m.step))
        assert [(m.step, m.value) for m in by_time] == sorted(expected.items())
    assert not run.spool_path.exists()
    assert len(_messages(caplog, "does not answer")) == 1  # one line, not one per step
    assert len(_messages(caplog, "answers again after")) == 1
    worst = max(outage_calls)
    print(
        f"\noutage: {len(outage_calls)} log_metrics calls, worst {worst * 1000:.2f} ms; "
        f"{len(values)} steps x 3 metrics all stored"
    )
    assert worst < 0.5


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_server_gone_for_good_the_stage_finishes_and_the_next_start_replays(
    server, tiny_project, tiny_params, monkeypatch, caplog, timed_log_metrics
):
    """A real SFT stage whose server is SIGKILLed after step 3 and never returns: the stage
    finishes within seconds with its model, metrics and run marker; the spool holds every
    step's metrics and the FINISHED status. With the server back, the next stage start sends
    them and ends the run with the outage tag naming what was not logged."""
    import rlhf_core.stages.sft as sft_stage
    from rlhf_core.config import DataSettings
    from rlhf_core.config.stages import SFTSettings
    from rlhf_core.config.training import TrainSettings
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.training_stage import TrainingStage
    from rlhf_core.tracking.lineage import read_producer_run_id

    caplog.set_level(logging.WARNING, logger="rlhf_core.tracking")
    original_step = TrainingStage.log_step
    killed_at = []

    def kill_after_step_3(self, step, metrics):
        original_step(self, step, metrics)
        if step == 3:
            server.kill()
            killed_at.append(time.monotonic())

    monkeypatch.setattr(TrainingStage, "log_step", kill_after_step_3)
    settings = SFTSettings(
        train=TrainSettings(
            learning_rate=1e-2,
            warmup_steps=1,
            epochs=2,
            batch_size=8,
            eval_every=3,
            checkpoint_every=2,
        ),
        num_samples=2,
        sample_max_new_tokens=8,
    )
    context = StageContext(
        DataSettings(eval_fraction=tiny_params.data.eval_fraction),
        0,
        tiny_project,
        show_progress=False,
    )
    metrics = sft_stage.run_sft(settings, context)
    finished_after_kill = time.monotonic() - killed_at[0]

    paths = ProjectPaths(tiny_project)
    load_causal_lm(str(paths.sft_model_dir))  # the model is whole
    assert json.loads(paths.metrics_file("sft").read_text()) == pytest.approx(metrics)
    run_id = read_producer_run_id(paths.sft_model_dir)  # the marker is written
    spooled = read_spool(spool_dir(tiny_project) / f"{run_id}.jsonl")
    assert spooled.end == "FINISHED"
    assert {"model (model)", "metrics/sft.json", "plots/sft_curves.png"} <= set(spooled.not_logged)
    assert f"output.{paths.sft_model_dir.relative_to(tiny_project).as_posix()}.md5" in (
        spooled.tags
    )
    spooled_losses = [m.step for m in spooled.metrics if m.key == "loss"]
    assert spooled_losses == sorted(spooled_losses)  # in the order they were logged
    assert set(range(4, metrics["steps"] + 1)) <= set(spooled_losses)  # all after the kill
    ended = _messages(caplog, "not ended on")
    assert len(ended) == 1 and str(spooled.path) in ended[0]
    assert len(_messages(caplog, "does not answer")) == 1

    # The server comes back; the next stage start (any stage) sends the spool.
    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    before = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert before | set(spooled_losses) == set(range(1, metrics["steps"] + 1))
    with stage_run("evaluate", project_root=tiny_project):
        pass
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    note = stored.data.tags[OUTAGE_TAG]
    assert "sent at" in note and "model (model)" in note
    assert stored.data.tags["resumed_from"] == "0"  # a tag set during the outage
    losses = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, metrics["steps"] + 1))
    assert not spooled.path.exists()
    print(
        f"\nserver gone: SFT finished {finished_after_kill:.1f} s after the kill, "
        f"{len(spooled.metrics)} metrics spooled, worst log_metrics "
        f"{max(timed_log_metrics) * 1000:.2f} ms, 0 lost after the replay"
    )
    assert finished_after_kill < 60
    assert max(timed_log_metrics) < 0.5


@pytest.mark.slow
def test_a_hung_server_costs_the_stage_seconds_not_minutes(
    server, tmp_path, monkeypatch, timed_log_metrics
):
    """A frozen server (SIGSTOP: it accepts connections and never answers) during the loop and
    at the end: steps stay fast, the stage ends within seconds of the final flush's limit,
    and once the server runs again the next start sends every step."""
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "3")
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)
    (project / "out" / "model.bin").write_bytes(b"weights")
    try:
        with stage_run("hung-probe", project_root=project) as run:
            for step in range(60):
                run.log_metrics({"loss": 1.0 / (step + 1)}, step)
            assert run.flush(timeout_s=30)
            server.freeze(True)
            for step in range(60, 200):
                run.log_metrics({"loss": 1.0 / (step + 1)}, step)
                time.sleep(0.01)
            run.record_output(project / "out")
            ending = time.monotonic()
        ended_after = time.monotonic() - ending
    finally:
        server.freeze(False)
    assert (project / "out" / "model.bin").read_bytes() == b"weights"
    spooled = read_spool(run.spool_path)
    assert spooled.end == "FINISHED" and "output.out.md5" in spooled.tags
    with stage_run("hung-probe", project_root=project):
        pass
    client = MlflowClient(server.uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and OUTAGE_TAG in stored.data.tags
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(200))
    print(
        f"\nhung server: stage ended {ended_after:.1f} s after its body, worst log_metrics "
        f"{max(timed_log_metrics) * 1000:.2f} ms over {len(timed_log_metrics)} calls"
    )
    assert ended_after < 15
    assert max(timed_log_metrics) < 0.5


def test_a_spool_of_a_process_killed_during_an_outage_fails_its_run(tracking_store, tmp_path):
    """A stage killed while its store was down leaves a spool with no end: the next start
    sends its metrics and ends the run FAILED; a torn last line is left out."""
    _, client = tracking_store
    dead = _running_run(client)  # left RUNNING, as by a kill
    spool = _write_spool(tmp_path, client, dead.run_id, pid=999_999_999, started=0.0)
    spool.write_text(spool.read_text() + '{"metrics": [["lo')  # cut short by the kill
    with stage_run("other", project_root=tmp_path):
        pass
    run = client.get_run(dead.run_id)
    assert run.info.status == "FAILED"
    assert "process died before the stage ended" in run.data.tags[OUTAGE_TAG]
    history = client.get_metric_history(dead.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5))
    assert not spool.exists()


def test_a_spool_still_being_written_is_left_and_a_refused_one_is_set_aside(
    tracking_store, tmp_path
):
    """No end line and its process alive: a stage still running, not replayed. A spool the
    store refuses (its run was deleted) is kept as <run id>.failed.jsonl and not retried."""
    import psutil

    _, client = tracking_store
    live = _running_run(client)
    me = psutil.Process(os.getpid())
    live_spool = _write_spool(tmp_path, client, live.run_id, me.pid, me.create_time())
    deleted = _running_run(client)
    client.delete_run(deleted.run_id)
    deleted_spool = _write_spool(tmp_path, client, deleted.run_id, 999_999_999, 0.0, end=True)
    with stage_run("other", project_root=tmp_path):
        pass
    assert live_spool.exists()
    assert client.get_run(live.run_id).info.status == "RUNNING"
    assert client.get_metric_history(live.run_id, "loss") == []
    assert not deleted_spool.exists()
    assert deleted_spool.with_name(f"{deleted.run_id}.failed.jsonl").exists()


def _running_run(client):
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    return client.create_run(experiment.experiment_id).info


def _write_spool(root, client, run_id, pid, started, end=False):
    """A spool file as a stage process writes it: header, 5 steps of loss, maybe an end."""
    spool = spool_dir(root) / f"{run_id}.jsonl"
    spool.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "run_id": run_id,
        "stage": "probe",
        "store": mask_uri(client.tracking_uri),
        "host": socket.gethostname(),
        "pid": pid,
        "started": started,
    }
    rows = [["loss", 1.0 / (s + 1), 1_700_000_000_000 + s, s] for s in range(5)]
    lines = [header, {"metrics": rows}] + ([{"end": "FINISHED"}] if end else [])
    spool.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return spool


def test_unreachable_is_a_store_that_does_not_answer_not_one_that_refuses(
    tracking_store, monkeypatch
):
    """Real client errors: a closed port is unreachable (calls are skipped, the run goes on);
    a run that does not exist is the store refusing (the error propagates)."""
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as refused_port:
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_run("0" * 32)
    assert is_unreachable(refused_port.value)
    with pytest.raises(MlflowException) as no_such_run:
        tracking_store[1].get_run("0" * 32)
    assert not is_unreachable(no_such_run.value)


def test_final_flush_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(FLUSH_TIMEOUT_ENV, raising=False)
    assert final_flush_timeout_s() == 30.0
    monkeypatch.setenv(FLUSH_TIMEOUT_ENV, "5")
    assert final_flush_timeout_s() == 5.0
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(FLUSH_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=FLUSH_TIMEOUT_ENV):
            final_flush_timeout_s()
