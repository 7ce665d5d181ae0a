"""The MLflow model of a save_pretrained folder (rlhf_core/tracking/models.py), as stages log it
with `StageRun.log_model_dir`: code and safetensors only, an explicit signature, and a pyfunc
that generates like `generation.generate` and scores like `generation.score`."""

import shutil

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from rlhf_core.config.training import SamplingSettings
from rlhf_core.generation import generate
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import PICKLED_WEIGHT_SUFFIXES, load_causal_lm, load_tokenizer
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import score
from rlhf_core.tracking.lineage import path_md5
from rlhf_core.tracking.models import (
    MODEL_CODE_FILE,
    POLICY,
    REWARD,
    model_kind,
    model_signature,
    pretrained_path,
)
from rlhf_core.tracking.runs import stage_run

PROMPTS = ["Review the film.", "Write a short review of the film."]


@pytest.fixture
def project(tiny_project, empty_mlflow_db, monkeypatch):
    shutil.copy(empty_mlflow_db, tiny_project / "mlflow.db")
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RLHF_EXPERIMENT", "mlflow-models-test")
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    # MLflow's process-wide URI (models:/ URIs resolve through it), put back after the test.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", uri)
    return tiny_project


def log_model(root, model_dir, stage="sft"):
    """Log `model_dir` as a stage does; (run id, logged model id)."""
    with stage_run(stage, project_root=root) as run:
        model_id = run.log_model_dir(model_dir, "model")
    return run.run_id, model_id


def test_a_logged_model_is_code_plus_the_safetensors_folder(project, tmp_path):
    sft_dir = ProjectPaths(project).sft_model_dir
    run_id, model_id = log_model(project, sft_dir)
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["model.model.model_id"] == model_id
    assert tags["model.model.md5"] == path_md5(sft_dir)

    local = tmp_path / "model"
    mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(local))
    mlmodel = Model.load(local)
    pyfunc = mlmodel.flavors["python_function"]
    assert pyfunc["model_code_path"].endswith(MODEL_CODE_FILE.name)
    assert "python_model" not in pyfunc  # nothing cloudpickled
    folder = local / pretrained_path(mlmodel)
    assert path_md5(folder) == path_md5(sft_dir)  # the folder, byte for byte
    files = [path.name for path in local.rglob("*") if path.is_file()]
    assert not [name for name in files if name.endswith((*PICKLED_WEIGHT_SUFFIXES, ".pickle"))]
    assert mlmodel.signature.to_dict() == model_signature(POLICY).to_dict()
    requirements = (local / "requirements.txt").read_text().split()
    assert {line.split("==")[0] for line in requirements} >= {"mlflow", "torch", "transformers"}


def test_the_policy_pyfunc_generates_what_generate_does(project):
    sft_dir = ProjectPaths(project).sft_model_dir
    _, model_id = log_model(project, sft_dir)
    policy = mlflow.pyfunc.load_model(f"models:/{model_id}")
    frame = pd.DataFrame({"prompt": PROMPTS})

    responses = policy.predict(frame, params={"max_new_tokens": 6, "seed": 5})
    model, tokenizer = load_causal_lm(sft_dir)
    expected = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": prompt}] for prompt in PROMPTS],
        SamplingSettings(max_new_tokens=6),
        seed=5,
    ).texts
    assert responses == expected
    defaults = policy.predict(frame)  # the signature's defaults: SamplingSettings(), seed 0
    assert len(defaults) == len(PROMPTS) and all(isinstance(text, str) for text in defaults)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        policy.predict(frame, params={"temperature": 0.0})


def test_the_reward_pyfunc_scores_what_the_reward_model_scores(project):
    reward_dir = ProjectPaths(project).reward_model_dir
    assert model_kind(reward_dir) == REWARD
    _, model_id = log_model(project, reward_dir, stage="reward")
    reward = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert reward.metadata.signature.to_dict() == model_signature(REWARD).to_dict()
    frame = pd.DataFrame({"prompt": PROMPTS, "response": ["Great fun!", "Dull and long."]})

    scores = reward.predict(frame)
    expected = score(
        RewardModel.from_pretrained(reward_dir),
        load_tokenizer(reward_dir),
        [[{"role": "user", "content": prompt}] for prompt in PROMPTS],
        frame["response"].tolist(),
    )
    assert all(isinstance(value, float) for value in scores)
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-6)
    with pytest.raises(MlflowException, match="response"):
        reward.predict(pd.DataFrame({"prompt": PROMPTS}))  # the signature asks for it


def test_log_model_dir_logs_into_its_own_run_only(project):
    sft_dir = ProjectPaths(project).sft_model_dir
    with stage_run("sft", project_root=project) as run:
        with mlflow.start_run(nested=True), pytest.raises(ValueError, match="not this stage's"):
            run.log_model_dir(sft_dir, "model")
        with pytest.raises(ValueError, match="not a save_pretrained model directory"):
            run.log_model_dir(project / "data", "model")


def test_pretrained_path_refuses_a_model_not_logged_by_rlhf():
    with pytest.raises(ValueError, match="has no 'pretrained' artifact"):
        pretrained_path(Model())
