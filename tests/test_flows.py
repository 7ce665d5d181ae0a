"""flows/ (pipeline, retrain, deployments) and rlhf_core/app/launch.py on the toy DVC repo.

One temporary Prefect API for the module (`prefect_test_harness`); the toy project is the one
of tests/test_tasks_dvc_stage.py (quick Python stages, two of them with MLflow runs).
"""

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from toy_project import TOY_ORDER, calls, init_repo, set_param

from rlhf_core.app import launch, mlflow_ui, prefect_server, processes
from rlhf_core.app.launch import load_entrypoint
from rlhf_core.data.store import IngestResult
from rlhf_core.orchestration import store_versioning
from rlhf_core.scripts import load_script
from rlhf_core.tracking.lineage import path_md5

REPO = Path(__file__).resolve().parents[1]
pipeline_module = load_script(REPO / "flows" / "pipeline.py")
retrain_module = load_script(REPO / "flows" / "retrain.py")
dvc_stage = pipeline_module.dvc_stage
gate_task = pipeline_module.gate_task

# A second toy pipeline with the layout the gate reads: a reward model and a DPO policy (each
# a directory with config.json, logged as its run's `model` artifacts) and
# artifacts/metrics/evaluate.json, whose win rate comes from quality.json.
TOY_GATE_STAGE = '''"""Toy gate stage: reward | dpo | evaluate."""
import json
import sys
from pathlib import Path

name = sys.argv[1]
if name == "evaluate":
    quality = json.loads(Path("quality.json").read_text())["win_rate"]
    policy = {"gold_win_rate_vs_sft": quality, "rm_win_rate_vs_sft": quality, "kl_to_sft": 1.0,
              "ended_fraction": 1.0}
    metrics = {"dpo": policy, "reward_model": {"eval_accuracy": 0.8}}
    Path("artifacts/metrics").mkdir(parents=True, exist_ok=True)
    Path("artifacts/metrics/evaluate.json").write_text(json.dumps(metrics))
else:
    from rlhf_core.tracking.runs import stage_run

    out = Path("artifacts/reward" if name == "reward" else "artifacts/policy/dpo")
    with stage_run(name) as run:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"toy": name}))
        run.log_model_dir(out, "model")
        run.record_output(out)
'''
TOY_GATE_DVC_YAML = {
    "stages": {
        "reward": {"cmd": "python gate_stage.py reward", "outs": ["artifacts/reward"]},
        "dpo": {
            "cmd": "python gate_stage.py dpo",
            "deps": ["artifacts/reward"],
            "outs": ["artifacts/policy/dpo"],
        },
        "evaluate": {
            "cmd": "python gate_stage.py evaluate",
            "deps": ["quality.json", "artifacts/policy", "artifacts/reward"],
            "metrics": [{"artifacts/metrics/evaluate.json": {"cache": False}}],
        },
    }
}

PAIR = {
    "prompt": [{"role": "user", "content": "Review the film {n}."}],
    "chosen": "A warm, funny film with a great cast; I loved it.",
    "rejected": "Bad. Bad bad bad.",
}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def write_pairs(path: Path, numbers) -> Path:
    rows = []
    for n in numbers:
        row = json.loads(json.dumps(PAIR))
        row["prompt"][0]["content"] = row["prompt"][0]["content"].format(n=n)
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Pure pieces of the pipeline flow and of orchestration
# --------------------------------------------------------------------------------------------


def test_key_metrics_are_the_first_numbers_without_durations():
    files = {"m/a.json": {"seconds": 3.0, "loss": 0.5, "n": {"ok": True, "acc": 0.9}, "x": "s"}}
    assert pipeline_module.key_metrics(files) == {"loss": 0.5, "n.acc": 0.9}
    two = {"m/a.json": {"loss": 1}, "m/b.json": {"loss": 2, "kl": 3}}
    assert pipeline_module.key_metrics(two, limit=2) == {"a.loss": 1.0, "b.loss": 2.0}


def test_summary_rows_split_metrics_files_from_versions():
    result = {
        "stage": "sft",
        "status": "ran",
        "duration_s": 1.5,
        "outputs": {"m/sft.json": "aa", "artifacts/sft": "0123456789abcdef.dir"},
        "run_id": "r1",
    }
    [row] = pipeline_module.summary_rows([result], {"m/sft.json": {"loss": 0.1}})
    assert row["version"] == "01234567" and row["metrics"] == {"loss": 0.1}
    table = pipeline_module.render_table([row], "t")
    assert "sft" in table and "loss=0.1" in table and "01234567" in table


def test_headline_metrics_are_each_policy_s_win_rates_and_kl_and_the_reward_accuracy():
    evaluation = {
        "sft": {"gold_win_rate_vs_sft": 0.5, "kl_to_sft": 0.0},
        "dpo": {"gold_win_rate_vs_sft": 0.9, "rm_win_rate_vs_sft": 0.8, "kl_to_sft": 4.0},
        "bon_4": {"gold_win_rate_vs_sft": 0.7, "rm_win_rate_vs_sft": None, "kl_to_sft": 0.6},
        "reward_model": {"eval_accuracy": 0.85, "eval_pairs": 40},
    }
    assert pipeline_module.headline_metrics(evaluation) == {
        "reward.eval_accuracy": 0.85,
        "dpo.gold_win_rate_vs_sft": 0.9,
        "dpo.rm_win_rate_vs_sft": 0.8,
        "dpo.kl_to_sft": 4.0,
        "bon_4.gold_win_rate_vs_sft": 0.7,
        "bon_4.kl_to_sft": 0.6,
    }
    assert pipeline_module.headline_metrics({}) == {}


def test_pipeline_run_names_say_what_changed_and_on_which_data():
    changes = pipeline_module.param_changes
    name = pipeline_module.pipeline_run_name
    assert changes({"a": "1"}, None) == "first run"
    assert changes({"a": "1"}, {"a": "1"}) == "no change"
    assert changes({"a": "2", "b": "x"}, {"a": "1", "b": "x"}) == "a=2"
    assert changes({"a": "2", "b": "y", "c": "z"}, {"a": "1", "b": "x"}) == "a=2 b=y +1 more"
    assert changes({}, {"gone": "1"}) == "gone=(removed)"
    assert name(1, "0123456789abcdef.dir", None, "first run") == "#1 first run | data 01234567"
    assert name(4, "ffff", "0123", "no change") == "#4 new data | data ffff"
    assert name(5, "ffff", "0123", "a=2") == "#5 new data, a=2 | data ffff"
    assert name(6, "none", "none", "a=2") == "#6 a=2 | data none"


def test_gate_settings_override_params_and_defaults(tmp_path):
    from rlhf_core.config.gate import GateSettings

    settings = gate_task.gate_settings(tmp_path, {"max_kl": 3, "candidate_policies": ["dpo"]})
    assert settings.max_kl == 3 and settings.candidate_policies == ("dpo",)
    assert gate_task.gate_settings(tmp_path) == GateSettings()


def test_load_entrypoint_loads_each_file_once_and_names_errors(tmp_path):
    assert load_entrypoint("flows/pipeline.py:pipeline") is pipeline_module.pipeline
    assert load_entrypoint(str(REPO / "flows/retrain.py") + ":retrain") is retrain_module.retrain
    with pytest.raises(ValueError, match="defines no 'nothing'"):
        load_entrypoint("flows/pipeline.py:nothing")
    with pytest.raises(ValueError, match=r"Cannot find flows/missing\.py"):
        load_entrypoint("flows/missing.py:flow", tmp_path)
    with pytest.raises(ValueError, match="must look like"):
        load_entrypoint("flows.pipeline")


def test_prefect_defaults_keep_home_in_the_project_and_telemetry_off(tmp_path):
    defaults = prefect_server.prefect_defaults(tmp_path)
    assert defaults["PREFECT_HOME"] == str(tmp_path.resolve() / ".prefect")
    assert defaults["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert defaults["DO_NOT_TRACK"] == "1"


def test_schedule_cron_reads_params_or_defaults():
    class Section:
        schedule_cron = "*/5 * * * *"

    class Params:
        orchestration = Section()

    assert launch.schedule_cron(Params()) == "*/5 * * * *"
    assert launch.schedule_cron(object()) == launch.DEFAULT_SCHEDULE_CRON


def test_mlflow_ui_command_points_at_the_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = mlflow_ui.mlflow_ui_command(tmp_path, 5123)
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == (
        f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5123"


def test_a_configured_prefect_api_that_does_not_answer_is_an_error(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    dead = f"http://127.0.0.1:{processes.free_port()}/api"
    assert not processes.api_is_healthy(dead, timeout_s=1)
    with (
        temporary_settings(updates={PREFECT_API_URL: dead}),
        pytest.raises(ValueError, match="does not answer"),
        prefect_server.prefect_server(tmp_path),
    ):
        pass


@pytest.mark.slow
def test_a_configured_prefect_api_is_used_as_is(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    with prefect_server.prefect_server(tmp_path) as api_url:
        assert api_url == PREFECT_API_URL.value() and processes.api_is_healthy(api_url)
    assert not (tmp_path / ".prefect").exists()  # no server of its own was started


def test_incoming_files_ignore_hidden_files_and_folders(tmp_path):
    (tmp_path / "b.jsonl").touch()
    (tmp_path / "a.jsonl").touch()
    (tmp_path / ".partial.jsonl").touch()
    (tmp_path / "processed").mkdir()
    assert [p.name for p in retrain_module.incoming_files(tmp_path)] == ["a.jsonl", "b.jsonl"]
    moved = retrain_module.move_to_processed(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").touch()
    again = retrain_module.move_to_processed(tmp_path / "a.jsonl")
    assert moved == tmp_path / "processed" / "a.jsonl" and again != moved and again.is_file()


@pytest.mark.slow
def test_ingest_incoming_moves_good_files_to_processed_and_unreadable_ones_aside(tmp_path):
    from rlhf_core.config.data import ValidationSettings
    from rlhf_core.data.store import read_table

    incoming, store = tmp_path / "incoming", tmp_path / "store"
    incoming.mkdir()
    good = write_pairs(incoming / "good.jsonl", range(5))
    (incoming / "notes.txt").write_text("not preference data")
    records = retrain_module.ingest_incoming(
        [good, incoming / "notes.txt"], store, ValidationSettings()
    )
    assert [(r["file"], r["status"], r["added"]) for r in records] == [
        ("good.jsonl", "ingested", 5),
        ("notes.txt", "unreadable", 0),
    ]
    assert "cannot tell the format" in records[1]["error"]
    assert (incoming / "processed" / "good.jsonl").is_file()
    assert (incoming / "unreadable" / "notes.txt").is_file()
    assert retrain_module.incoming_files(incoming) == [] and len(read_table(store)) == 5
    # A link to a file elsewhere is refused and set aside, the link itself (never its target).
    outside = write_pairs(tmp_path / "outside.jsonl", range(5, 9))
    (incoming / "linked.jsonl").symlink_to(outside)
    [linked] = retrain_module.ingest_incoming(
        retrain_module.incoming_files(incoming), store, ValidationSettings()
    )
    assert (linked["file"], linked["status"]) == ("linked.jsonl", "unreadable")
    assert "symbolic link" in linked["error"]
    assert (incoming / "unreadable" / "linked.jsonl").is_symlink() and outside.is_file()
    assert len(read_table(store)) == 5


def test_project_lock_lets_one_holder_in_at_a_time(tmp_path):
    intervals = []

    def hold():
        with retrain_module.project_lock(tmp_path):
            entered = time.monotonic()
            time.sleep(0.5)
            intervals.append((entered, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = sorted(intervals)
    assert first[1] <= second[0]


# --------------------------------------------------------------------------------------------
# Flows on the toy DVC repository
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_runs_the_dag_under_one_parent_run_and_skips_what_is_current(prefect_api, toy):
    client = mlflow_client(toy)
    summary = pipeline_module.pipeline(project_root=str(toy))
    assert [s["stage"] for s in summary["stages"]] == TOY_ORDER
    assert summary["ran"] == TOY_ORDER and calls(toy) == ["first", "second_x", "second_y", "third"]
    assert summary["gate"]["status"] == "skipped"
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] != "none"
    assert parent.data.tags["stage.second.x.status"] == "ran"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
    assert artifacts == {"pipeline/summary.txt", "pipeline/summary.json"}
    by_stage = {s["stage"]: s for s in summary["stages"]}
    for stage in ("first", "third"):  # the stages with MLflow runs nest under the pipeline
        run = client.get_run(by_stage[stage]["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (
        by_stage["first"]["outputs"]["out/first"]
        == dvc_stage.locked_outputs(toy, "first")["out/first"]
    )
    assert "loss=0.25" in summary["table"] and "seconds" not in summary["table"]

    again = pipeline_module.pipeline(project_root=str(toy))
    assert again["ran"] == [] and len(calls(toy)) == 4
    assert [s["run_id"] for s in again["stages"]] == [s["run_id"] for s in summary["stages"]]

    set_param(toy, "data.split_salt", "v2")  # read by second@x and second@y only
    changed = pipeline_module.pipeline(project_root=str(toy))
    statuses = {s["stage"]: s["status"] for s in changed["stages"]}
    assert statuses == {"first": "skipped", "second@x": "ran", "second@y": "ran", "third": "ran"}

    # The runs table tells the three pipeline runs apart by name, and the compare view can
    # line them up by any params.yaml knob.
    names = [client.get_run(s["mlflow_run_id"]).info.run_name for s in (summary, again, changed)]
    assert names[0].startswith("#1 first run | data ")
    assert names[1].startswith("#2 no change | data ")
    assert names[2].startswith("#3 data.split_salt=v2 | data ")
    latest = client.get_run(changed["mlflow_run_id"])
    assert latest.data.params["data.split_salt"] == "v2"
    assert latest.data.tags["previous_pipeline_run"] == again["mlflow_run_id"]
    assert latest.data.metrics["gate.promoted"] == 0.0
    assert latest.data.tags["gate.status"] == "skipped"


@pytest.mark.slow
def test_a_failing_stage_stops_the_pipeline_and_fails_its_run(prefect_api, toy):
    (toy / "broken_second_x").touch()
    with pytest.raises(RuntimeError, match=r"Stage 'second@x' failed.*not run: second@y, third"):
        pipeline_module.pipeline(project_root=str(toy))
    assert calls(toy) == ["first", "second_x"]  # no retry: the failure is the stage's own
    [parent] = mlflow_client(toy).search_runs(
        [mlflow_client(toy).get_experiment_by_name("rlhf").experiment_id],
        "tags.stage = 'pipeline'",
    )
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == "second@x"


@pytest.mark.slow
def test_transient_failures_are_retried_and_others_are_not(prefect_api, toy):
    quick = dvc_stage.run_stage.with_options(retry_delay_seconds=0)
    (toy / "flaky_first").touch()  # fails once with DVC's lock message
    assert quick("first", str(toy))["status"] == "ran"
    assert calls(toy) == ["first", "first"]
    (toy / "broken_second_x").touch()
    with pytest.raises(dvc_stage.DvcCommandError):
        quick("second@x", str(toy))
    assert calls(toy) == ["first", "first", "second_x"]


@pytest.mark.slow
def test_retrain_without_new_data_ends_quickly_and_says_so(prefect_api, toy):
    (toy / "data" / "incoming" / ".upload-in-progress.jsonl").write_text("{}")
    result = retrain_module.retrain(project_root=str(toy))
    assert result["status"] == "no_new_data" and result["pipeline"] is None
    assert "nothing to retrain" in result["message"] and result["ingested"] == []
    assert result["released_at"] - result["locked_at"] < 5 and calls(toy) == []


@pytest.mark.slow
def test_two_retrains_started_together_run_one_after_the_other(prefect_api, toy):
    write_pairs(toy / "data" / "incoming" / "batch1.jsonl", range(12))
    results = []

    def run():
        results.append(retrain_module.retrain(project_root=str(toy)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = sorted(results, key=lambda r: r["locked_at"])
    assert first["released_at"] <= second["locked_at"]
    assert first["status"] == "retrained" and first["added"] == 12
    assert first["pipeline"]["ran"] == TOY_ORDER  # the store is a dependency of `first`
    assert second["status"] == "no_new_data"
    assert (toy / "data" / "incoming" / "processed" / "batch1.jsonl").is_file()
    assert not (toy / "data" / "incoming" / "batch1.jsonl").exists()


def test_the_store_is_new_until_dvc_lock_records_its_md5(tmp_path):
    store = tmp_path / "data" / "preferences"
    store.mkdir(parents=True)
    assert not retrain_module.store_changed_since_last_run(tmp_path, store)  # empty store
    write_pairs(store / "pairs.jsonl", range(2))
    assert retrain_module.store_changed_since_last_run(tmp_path, store)  # no dvc.lock yet
    lock = {
        "stages": {"validate": {"deps": [{"path": "data/preferences", "md5": path_md5(store)}]}}
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert not retrain_module.store_changed_since_last_run(tmp_path, store)
    (store / "more.jsonl").write_text("{}\n")
    assert retrain_module.store_changed_since_last_run(tmp_path, store)


@pytest.mark.slow
def test_rows_ingested_outside_the_flow_still_trigger_a_retrain(prefect_api, toy):
    from rlhf_core.data.store import ingest_files

    store = toy / "data" / "preferences"
    ingest_files([write_pairs(toy / "extra.jsonl", range(12))], store)  # as `rlhf ingest` does
    result = retrain_module.retrain(project_root=str(toy))
    assert result["status"] == "retrained" and result["added"] == 0
    assert "added to the store since the last run" in result["message"]
    assert result["pipeline"]["ran"] == TOY_ORDER
    assert not retrain_module.store_changed_since_last_run(toy, store)


@pytest.mark.slow
def test_the_gate_keeps_a_weak_candidate_then_promotes_the_first_champion(
    prefect_api, tmp_path, monkeypatch
):
    from rlhf_core.tracking import registry
    from rlhf_core.tracking.lineage import read_producer_run_id

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "RLHF_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    files = {
        "gate_stage.py": TOY_GATE_STAGE,
        "dvc.yaml": yaml.safe_dump(TOY_GATE_DVC_YAML, sort_keys=False),
        "params.yaml": "seed: 0\n",
        "quality.json": json.dumps({"win_rate": 0.4}),
    }
    root = init_repo(tmp_path / "gated", files)
    client = mlflow_client(root)

    weak = pipeline_module.pipeline(project_root=str(root))
    assert weak["gate"]["status"] == "kept" and weak["gate"]["candidate"] is None
    assert registry.current_champion(client) is None
    assert client.get_run(weak["mlflow_run_id"]).data.tags["gate.result"] == "failed"

    (root / "quality.json").write_text(json.dumps({"win_rate": 0.8}))  # only evaluate reruns
    strong = pipeline_module.pipeline(project_root=str(root))
    assert strong["ran"] == ["evaluate"]
    assert strong["gate"]["status"] == "promoted" and strong["gate"]["candidate"] == "dpo"
    champion = registry.current_champion(client)
    assert str(champion.version) == strong["gate"]["policy_version"]
    assert champion.run_id == read_producer_run_id(root / "artifacts" / "policy" / "dpo")
    assert client.get_run(strong["mlflow_run_id"]).data.tags["gate.result"] == "passed"

    same = pipeline_module.pipeline(project_root=str(root))
    assert same["ran"] == [] and same["gate"]["status"] == "unchanged"
    assert client.get_run(same["mlflow_run_id"]).data.tags["gate.result"] == "unchanged"
    assert registry.current_champion(client).version == champion.version


# --------------------------------------------------------------------------------------------
# Deployments and events (need the Prefect API)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_retrain_deployment_has_schedule_trigger_and_a_limit_of_one(prefect_api, toy):
    from prefect.client.orchestration import get_client

    deployments_module = load_script(REPO / "flows" / "deployments.py")
    [deployment] = deployments_module.retrain_deployments(str(toy), "15 2 * * *")
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        [automation] = client.read_automations_by_name(
            deployments_module.trigger_name(toy.resolve())
        )
    assert stored.entrypoint.endswith("flows/retrain.py:retrain")
    assert stored.parameters == {"project_root": str(toy.resolve())}
    assert [s.schedule.cron for s in stored.schedules] == ["15 2 * * *"]
    assert stored.global_concurrency_limit.limit == 1
    assert stored.concurrency_options.collision_strategy == "ENQUEUE"
    assert automation.trigger.expect == {store_versioning.INGESTED_EVENT}
    resource = store_versioning.ingested_resource_id(toy / "data" / "preferences")
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": resource}
    [action] = automation.actions
    assert action.type == "run-deployment" and action.deployment_id == deployment_id


@pytest.mark.slow
def test_ingested_event_is_sent_only_when_rows_were_added(prefect_api, tmp_path):
    added = IngestResult(file="a.jsonl", sha256="ab" * 32, status="ingested", added=3)
    nothing = IngestResult(file="b.jsonl", sha256="cd" * 32, status="already_ingested")
    assert store_versioning.emit_ingested_event(tmp_path, [nothing]) is None
    event = store_versioning.emit_ingested_event(tmp_path, [added, nothing])
    assert event.event == store_versioning.INGESTED_EVENT
    assert event.resource.id == store_versioning.ingested_resource_id(tmp_path)
    assert event.payload["added"] == 3 and event.payload["files"] == ["a.jsonl"]


def test_no_event_without_a_configured_api(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    added = IngestResult(file="a.jsonl", sha256="ab" * 32, status="ingested", added=3)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert store_versioning.emit_ingested_event(tmp_path, [added]) is None


def test_stage_reasons_skip_up_to_date_stages_unless_something_upstream_ran():
    reasons = pipeline_module.stage_reasons
    stale = {"sft": ["changed deps: data/validated/sft (modified)"]}
    assert reasons("sft", stale, []) == stale["sft"]
    assert reasons("reward", stale, []) == []  # up to date, nothing reran: no DVC process
    assert reasons("reward", stale, ["sft"]) == ["upstream stage ran: sft"]
    assert reasons("sft", stale, ["prepare"]) == stale["sft"]  # DVC's own reasons first


def test_stale_stages_is_one_status_for_the_whole_dag(toy):
    root = toy
    first = dvc_stage.stale_stages(root)
    assert set(first) == set(TOY_ORDER)  # nothing ran yet
    assert all(first[name] for name in first)
    dvc_stage.run_stage.fn("first", str(root))
    after = dvc_stage.stale_stages(root)
    assert "first" not in after
    assert not any(name.endswith(".dvc") for name in after)


def test_summary_metrics_are_read_from_the_declared_metric_outputs_without_dvc(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "train": {
                        "cmd": "x",
                        "metrics": [{"out/metrics/train.json": {"cache": False}}],
                    },
                    "policy": {
                        "foreach": "${algos}",
                        "do": {"cmd": "y", "metrics": ["out/metrics/${item}.json"]},
                    },
                }
            }
        )
    )
    (tmp_path / "out" / "metrics").mkdir(parents=True)
    (tmp_path / "out" / "metrics" / "train.json").write_text('{"loss": 0.5}')
    (tmp_path / "out" / "metrics" / "dpo.json").write_text('{"win": 0.9}')
    (tmp_path / "out" / "metrics" / "broken.json").write_text("{not json")
    (tmp_path / "out" / "plot.json").write_text('{"x": 1}')
    results = [
        {"outputs": {"out/metrics/train.json": "a", "out/model": "b", "out/plot.json": "c"}},
        {"outputs": {"out/metrics/dpo.json": "d", "out/metrics/broken.json": "e"}},
    ]
    metrics = pipeline_module.dvc_metrics(tmp_path, results)
    assert metrics == {
        "out/metrics/train.json": {"loss": 0.5},
        "out/metrics/dpo.json": {"win": 0.9},
    }
