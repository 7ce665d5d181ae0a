"""The model registry: candidate registration with lineage, champion promotion, downloads, the
registered versions as MLflow models (pyfunc and `mlflow models serve`) and the gate decision's
record, on real stage runs in a throwaway sqlite store."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from rlhf_core.config.gate import GateSettings
from rlhf_core.gate import decide
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm, load_tokenizer
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import score
from rlhf_core.tracking.lineage import RUN_INFO_FILE, file_md5, path_md5, run_marker_path
from rlhf_core.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    POLICY_MODEL,
    REWARD_MODEL,
    RegisteredCandidate,
    current_champion,
    download_model_dir,
    log_decision,
    promote,
    register_candidate,
)
from rlhf_core.tracking.registry_lineage import LINEAGE_TAG, lineage_chain, version_lineage
from rlhf_core.tracking.runs import stage_run

EVALUATION = {
    "dpo": {
        "gold_score_mean": 0.3,
        "rm_score_mean": 0.2,
        "gold_win_rate_vs_sft": 0.71,
        "rm_win_rate_vs_sft": 0.66,
        "kl_to_sft": 4.5,
        "mean_length": 21.0,
        "ended_fraction": 1.0,
    },
    "reward_model": {"eval_accuracy": 0.72, "eval_margin_mean": 0.5, "annotator_agreement": 0.8},
}


@pytest.fixture
def project(tiny_project, empty_mlflow_db, monkeypatch):
    """The tiny project with its own tracking store and no producer markers from elsewhere."""
    for marker in tiny_project.rglob(f"*{RUN_INFO_FILE}"):
        marker.unlink()
    database = tiny_project / "mlflow.db"
    shutil.copy(empty_mlflow_db, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.setenv("RLHF_EXPERIMENT", "registry-test")
    # MLflow's process-wide URI (models:/ URIs resolve through it), put back after the test.
    monkeypatch.setattr(
        "mlflow.tracking._tracking_service.utils._tracking_uri", f"sqlite:///{database}"
    )
    return tiny_project


@pytest.fixture
def client(project):
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def run_model_stage(root, stage, inputs, model_dir, params=None):
    """A stage run that reads `inputs`, logs `model_dir` as its model and records it."""
    with stage_run(stage, project_root=root, params=params or {}, inputs=inputs) as run:
        run.log_model_dir(model_dir, "model")
        run.record_output(model_dir)
    return run.run_id


def run_policy_stage(root, beta=0.1):
    """A "dpo" stage whose policy is a copy of the SFT model, read with the preference data."""
    paths = ProjectPaths(root)
    policy_dir = paths.policy_dir("dpo")
    shutil.rmtree(policy_dir, ignore_errors=True)
    shutil.copytree(paths.sft_model_dir, policy_dir)
    inputs = {"preferences": paths.validated_set("preference"), "reference": paths.sft_model_dir}
    return run_model_stage(root, "dpo", inputs, policy_dir, params={"dpo": {"beta": beta}})


@pytest.fixture
def stage_runs(project):
    """sft (SFT data + base model) -> reward (preferences + SFT) and dpo (preferences + SFT)."""
    paths = ProjectPaths(project)
    sft = run_model_stage(
        project,
        "sft",
        {"train": paths.validated_set("sft"), "base": paths.base_model_dir},
        paths.sft_model_dir,
        params={"sft": {"lr": 0.001}},
    )
    reward = run_model_stage(
        project,
        "reward",
        {"preferences": paths.validated_set("preference"), "sft": paths.sft_model_dir},
        paths.reward_model_dir,
    )
    return {"sft": sft, "reward": reward, "dpo": run_policy_stage(project)}


# --------------------------------------------------------------------------------------------
# Registration and lineage
# --------------------------------------------------------------------------------------------


def test_register_candidate_creates_versions_with_the_candidate_alias_and_lineage(
    project, client, stage_runs
):
    paths = ProjectPaths(project)
    candidate = register_candidate(project, "dpo", EVALUATION)
    policy = client.get_model_version_by_alias(POLICY_MODEL, CANDIDATE)
    reward = client.get_model_version_by_alias(REWARD_MODEL, CANDIDATE)
    assert (str(policy.version), str(reward.version)) == (
        candidate.policy_version,
        candidate.reward_version,
    )
    assert policy.run_id == stage_runs["dpo"] and reward.run_id == stage_runs["reward"]
    dpo_run = client.get_run(stage_runs["dpo"])
    assert policy.source == f"models:/{dpo_run.data.tags['model.model.model_id']}"
    assert "dpo policy" in policy.description

    # The few tags a reviewer reads; the rest is in the lineage file.
    preference_md5 = path_md5(paths.validated_set("preference"))
    assert policy.tags == {
        "stage": "dpo",
        "git_commit": dpo_run.data.tags["git_commit"],
        "data_version": preference_md5,
        "model_md5": path_md5(paths.policy_dir("dpo")),
        "gold_win_rate_vs_sft": "0.71",
        "rm_win_rate_vs_sft": "0.66",
        "kl_to_sft": "4.5",
        LINEAGE_TAG: f"runs:/{stage_runs['dpo']}/lineage/{POLICY_MODEL}-v{policy.version}.json",
    }
    assert set(reward.tags) == {
        "stage", "git_commit", "data_version", "model_md5", "eval_accuracy", LINEAGE_TAG
    }  # fmt: skip
    assert reward.tags["eval_accuracy"] == "0.72" and reward.tags["data_version"] == preference_md5

    lineage = version_lineage(client, policy)
    assert (lineage["model"], lineage["version"]) == (POLICY_MODEL, str(policy.version))
    assert lineage["run_id"] == stage_runs["dpo"] and lineage["stage"] == "dpo"
    # Data read only by the upstream sft run is found by walking the chain.
    assert lineage["data"] == {
        "data/validated/sft": path_md5(paths.validated_set("sft")),
        "data/validated/preference": preference_md5,
    }
    assert lineage["external"] == {"base": path_md5(paths.base_model_dir)}
    assert lineage["upstream_runs"] == [stage_runs["sft"]]
    assert [entry["stage"] for entry in lineage["chain"]] == ["dpo", "sft"]
    assert lineage["chain"][0]["inputs"]["reference"]["run_id"] == stage_runs["sft"]
    assert lineage["metrics"]["evaluation"] == EVALUATION["dpo"]
    assert lineage["params"]["dpo.beta"] == "0.1"
    assert lineage["policy_name"] == "dpo" and lineage["reward_run_id"] == stage_runs["reward"]

    reward_lineage = version_lineage(client, reward)
    assert reward_lineage["metrics"]["evaluation"]["eval_margin_mean"] == 0.5
    assert reward_lineage["upstream_runs"] == [stage_runs["sft"]]


def test_version_tags_stay_few_through_promotion_and_re_registration(project, client, stage_runs):
    old = register_candidate(project, "dpo", EVALUATION)
    promote(client, old)
    run_policy_stage(project, beta=0.3)
    decision = decide(EVALUATION, GateSettings(), 0.9, has_champion=True)
    new = register_candidate(project, "dpo", EVALUATION, decision)
    experiment = client.get_experiment_by_name("registry-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        log_decision(decision, new, client)
    promote(client, new)
    champion = client.get_model_version(POLICY_MODEL, new.policy_version)
    assert {"gate", "gate.run_id", "promoted_at", "previous_champion"} <= set(champion.tags)
    assert len(champion.tags) <= 12

    # Registering the same run again keeps one version, the gate's tags and a reviewer's
    # own, and drops a headline metric the evaluation no longer has.
    client.set_model_version_tag(POLICY_MODEL, new.policy_version, "reviewed_by", "ana")
    evaluation = {**EVALUATION, "dpo": {**EVALUATION["dpo"], "gold_win_rate_vs_sft": None}}
    again = register_candidate(project, "dpo", evaluation)
    assert again.policy_version == new.policy_version
    tags = client.get_model_version(POLICY_MODEL, new.policy_version).tags
    assert tags["gate"] == "passed" and tags["reviewed_by"] == "ana"
    assert "gold_win_rate_vs_sft" not in tags
    assert version_lineage(client, champion)["params"]["dpo.beta"] == "0.3"


def test_version_lineage_explains_a_version_without_a_lineage_file(project, client, stage_runs):
    candidate = register_candidate(project, "dpo", EVALUATION)
    client.delete_model_version_tag(POLICY_MODEL, candidate.policy_version, LINEAGE_TAG)
    bare = client.get_model_version(POLICY_MODEL, candidate.policy_version)
    with pytest.raises(ValueError, match="has no 'lineage' tag"):
        version_lineage(client, bare)


def test_lineage_chain_walks_the_policy_version_back_to_its_data(project, client, stage_runs):
    paths = ProjectPaths(project)
    register_candidate(project, "dpo", EVALUATION)
    policy = client.get_model_version_by_alias(POLICY_MODEL, CANDIDATE)
    chain = lineage_chain(client, policy.run_id)
    assert [entry["stage"] for entry in chain] == ["dpo", "sft"]
    assert [entry["run_id"] for entry in chain] == [stage_runs["dpo"], stage_runs["sft"]]
    sft_inputs = chain[-1]["inputs"]
    assert sft_inputs["train"]["md5"] == path_md5(paths.validated_set("sft"))
    assert "run_id" not in sft_inputs["train"]  # data: the walk ends here


def test_lineage_chain_survives_cycles_and_runs_missing_from_the_store(project, client):
    experiment = client.create_experiment("hand-made", artifact_location=(project / "x").as_uri())
    first = client.create_run(experiment).info.run_id
    second = client.create_run(experiment).info.run_id
    client.set_tag(first, "input.up.run_id", second)
    client.set_tag(second, "input.down.run_id", first)
    client.set_tag(second, "input.gone.run_id", "0" * 32)
    chain = lineage_chain(client, first)
    assert [entry["run_id"] for entry in chain] == [first, second, "0" * 32]
    assert chain[-1]["stage"] is None and chain[-1]["inputs"] == {}


def test_registering_the_same_run_again_reuses_its_version(project, client, stage_runs):
    first = register_candidate(project, "dpo", EVALUATION)
    again = register_candidate(project, "dpo", EVALUATION)
    assert again == first
    run_policy_stage(project, beta=0.2)
    retrained = register_candidate(project, "dpo", EVALUATION)
    assert int(retrained.policy_version) == int(first.policy_version) + 1
    assert retrained.reward_version == first.reward_version
    candidate_now = client.get_model_version_by_alias(POLICY_MODEL, CANDIDATE)
    assert str(candidate_now.version) == retrained.policy_version


def test_register_candidate_explains_what_is_missing(project, client, stage_runs):
    with pytest.raises(ValueError, match="no metrics for policy 'ppo'"):
        register_candidate(project, "ppo", EVALUATION)
    policy_dir = ProjectPaths(project).policy_dir("dpo")
    run_marker_path(policy_dir).unlink()
    with pytest.raises(ValueError, match="No run is known to have produced"):
        register_candidate(project, "dpo", EVALUATION)
    with stage_run("dpo", project_root=project) as run:  # a run that logged no model
        run.record_output(policy_dir)
    with pytest.raises(ValueError, match="logged no MLflow model 'model'"):
        register_candidate(project, "dpo", EVALUATION)


# --------------------------------------------------------------------------------------------
# Champion
# --------------------------------------------------------------------------------------------


def test_current_champion_is_none_until_a_promotion(project, client, stage_runs):
    assert current_champion(client) is None
    candidate = register_candidate(project, "dpo", EVALUATION)
    assert current_champion(client) is None  # registered, alias not set yet
    promote(client, candidate)
    champion = current_champion(client)
    assert str(champion.version) == candidate.policy_version
    assert str(current_champion(client, REWARD_MODEL).version) == candidate.reward_version


def test_promote_moves_the_champion_from_the_old_version_to_the_new(project, client, stage_runs):
    old = register_candidate(project, "dpo", EVALUATION)
    promote(client, old)
    run_policy_stage(project, beta=0.3)
    new = register_candidate(project, "dpo", EVALUATION)
    kept = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION)
    assert str(kept.version) == old.policy_version
    promote(client, new)
    champion = client.get_model_version_by_alias(POLICY_MODEL, CHAMPION)
    assert str(champion.version) == new.policy_version != old.policy_version
    assert champion.tags["previous_champion"] == old.policy_version
    assert "promoted_at" in champion.tags
    assert CHAMPION not in client.get_model_version(POLICY_MODEL, old.policy_version).aliases


def test_download_model_dir_returns_the_registered_files_loadable(project, client, stage_runs):
    policy_dir = ProjectPaths(project).policy_dir("dpo")
    promote(client, register_candidate(project, "dpo", EVALUATION))
    shutil.rmtree(policy_dir)  # the champion's files no longer in artifacts/
    downloaded = download_model_dir(client, current_champion(client), project / "champion")
    model, tokenizer = load_causal_lm(str(downloaded))
    sft_weights = ProjectPaths(project).sft_model_dir / "model.safetensors"
    assert file_md5(downloaded / "model.safetensors") == file_md5(sft_weights)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    # Only the save_pretrained folder comes down, not the MLflow wrapper around it.
    assert not list((project / "champion").rglob("MLmodel"))


def test_the_champion_loads_as_an_mlflow_model_and_predicts(project, client, stage_runs):
    paths = ProjectPaths(project)
    promote(client, register_candidate(project, "dpo", EVALUATION))

    policy = mlflow.pyfunc.load_model(f"models:/{POLICY_MODEL}@{CHAMPION}")
    prompts = pd.DataFrame({"prompt": ["Review the film.", "Write a short review."]})
    responses = policy.predict(prompts, params={"max_new_tokens": 6, "seed": 3})
    assert len(responses) == 2 and all(isinstance(text, str) for text in responses)
    assert policy.predict(prompts, params={"max_new_tokens": 6, "seed": 3}) == responses

    reward = mlflow.pyfunc.load_model(f"models:/{REWARD_MODEL}@{CHAMPION}")
    pairs = pd.DataFrame(
        {"prompt": ["Review the film.", "Review the film."], "response": ["Great!", "Bad."]}
    )
    scores = reward.predict(pairs)
    assert len(scores) == 2 and all(isinstance(value, float) for value in scores)
    own = score(
        RewardModel.from_pretrained(paths.reward_model_dir),
        load_tokenizer(paths.reward_model_dir),
        [[{"role": "user", "content": prompt}] for prompt in pairs["prompt"]],
        pairs["response"].tolist(),
    )
    assert torch.allclose(torch.tensor(scores), own, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (the CLI and the uvicorn it starts), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the group is gone already
        try:
            process.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion(project, client, stage_runs):
    promote(client, register_candidate(project, "dpo", EVALUATION))
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        # As in an activated venv: the server starts `uvicorn` found on PATH.
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }
    command = [
        os.path.join(bin_dir, "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{POLICY_MODEL}@{CHAMPION}",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    log_file = project / "serve.log"
    with open(log_file, "w") as log:
        server = subprocess.Popen(
            command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        answer = None
        while answer is None:
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            try:
                answer = _post_json(
                    f"http://127.0.0.1:{port}/invocations",
                    {
                        "dataframe_records": [{"prompt": "Review the film."}],
                        "params": {"max_new_tokens": 5},
                    },
                )
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
    finally:
        _stop_process_group(server)
    predictions = answer["predictions"]
    assert len(predictions) == 1 and isinstance(predictions[0], str)


# --------------------------------------------------------------------------------------------
# Gate decision record
# --------------------------------------------------------------------------------------------


def test_log_decision_records_the_decision_on_the_run_and_the_versions(project, client, stage_runs):
    decision = decide(EVALUATION, GateSettings(), 0.4, has_champion=True)
    assert decision.candidate == "dpo" and not decision.promote
    candidate = register_candidate(project, "dpo", EVALUATION, decision)
    experiment = client.get_experiment_by_name("registry-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as pipeline_run:
        log_decision(decision, candidate, client)
    run = client.get_run(pipeline_run.info.run_id)
    assert run.data.tags["gate.result"] == "failed"
    assert run.data.tags["gate.candidate"] == "dpo"
    assert run.data.metrics["gate.dpo.win_rate_vs_champion"] == 0.4
    assert float(run.data.params["gate.threshold.dpo.win_rate_vs_champion"]) == 0.55
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="gate.json", dst_path=str(project / "gate")
    )
    with open(local) as handle:
        assert json.load(handle) == decision.as_dict()
    policy = client.get_model_version(POLICY_MODEL, candidate.policy_version)
    assert policy.tags["gate"] == "failed" and policy.tags["gate.run_id"] == run.info.run_id


def test_log_decision_needs_an_active_run_and_the_selected_candidate(project, client):
    decision = decide(EVALUATION, GateSettings(), None, has_champion=False)
    with pytest.raises(ValueError, match="active MLflow run"):
        log_decision(decision, None, client)
    with pytest.raises(ValueError, match="'dpo', not 'ppo'"):
        log_decision(decision, RegisteredCandidate("1", "1", "ppo"), client)
