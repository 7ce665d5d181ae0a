"""The PPO stage on the tiny project: outputs, metrics, curves, MLflow run, resume."""

import json

import pytest
import torch
from tiny_models import TINY_PPO_TRAIN

from rlhf_core.config.stages import PPOSettings
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.evaluation.overoptimisation import NO_GOLD
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.ppo import FINAL_ITERATION_METRICS, run_ppo
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.tracking.runs import StageRun

ITERATIONS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_settings(**overrides) -> PPOSettings:
    train = dict(TINY_PPO_TRAIN, iterations=ITERATIONS, eval_every=2, checkpoint_every=1)
    return PPOSettings(train=PPOTrainSettings(**{**train, **overrides}), max_eval_prompts=4)


@pytest.fixture
def tracking_uri(tiny_project, monkeypatch) -> str:
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_run_ppo_writes_the_policy_metrics_curves_and_an_mlflow_run(
    tiny_project, tiny_params, tracking_uri
):
    from mlflow import MlflowClient

    paths = ProjectPaths(tiny_project)
    metrics = run_ppo(
        tiny_settings(), StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
    )

    # The policy: a plain causal LM plus its value head, reloaded whole.
    out = paths.policy_dir("ppo")
    policy = PolicyWithValueHead.from_pretrained(out).eval()
    lm_only, tokenizer = load_causal_lm(str(out))
    sft, _ = load_causal_lm(str(paths.sft_model_dir))
    input_ids = torch.tensor([tokenizer.encode("the film was good", add_special_tokens=False)])
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits, values = policy(input_ids, attention_mask)
        lm_logits = lm_only(input_ids=input_ids, attention_mask=attention_mask).logits
        sft_logits = sft(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(lm_logits, logits, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, sft_logits)  # PPO changed the policy
    assert values.shape == input_ids.shape and bool(torch.isfinite(values).all())
    assert read_producer_run_id(out) is not None  # its run marker, beside the output

    # Metrics file (DVC metrics) and curves (DVC plots + PNG).
    saved = json.loads(paths.metrics_file("ppo").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["iterations"] == ITERATIONS and metrics["resumed_from"] == 0
    for key in ("reward/score_mean", "kl/mean", "kl/coef", "eval/score_mean", "eval/kl_mean"):
        assert key in metrics
    # The demo's gold judge scores every evaluation; the alarm and the fits read the curves.
    assert -1.0 <= metrics["eval/gold_score_mean"] <= 1.0
    assert -1.0 <= metrics["eval_initial/gold_score_mean"] <= 1.0
    assert metrics["overoptimisation/alarm"] in (0, 1)
    assert metrics["overoptimisation/status"] in ("fired", "silent")
    assert metrics["overoptimisation/window"] == 3  # evaluations at steps 0, 2 and 3
    assert (metrics["overoptimisation/first_step"] == 3) == (metrics["overoptimisation/alarm"] == 1)
    assert isinstance(metrics["overoptimisation/gold_change"], float)
    assert metrics["eval_initial/kl_mean"] == pytest.approx(0.0, abs=1e-4)  # policy == SFT
    assert metrics["eval_prompts"] >= 1 and metrics["train_prompts"] >= 8
    rows = json.loads((paths.plots_dir / "ppo_curves.json").read_text())
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert rows[0]["reward/score_mean"] is None and rows[0]["eval/score_mean"] is not None
    assert rows[1]["eval/score_mean"] is None and rows[2]["eval/score_mean"] is not None
    assert (paths.plots_dir / "ppo_curves.png").stat().st_size > 1000
    assert not paths.checkpoints_dir("ppo").exists()

    # The MLflow run: per-iteration curves, eval curves, params, lineage, model artifacts.
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("rlhf")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'ppo'")
    assert run.info.status == "FINISHED"
    for key in (
        *FINAL_ITERATION_METRICS,
        *("policy/clip_fraction", "policy/approx_kl", "value/loss", "value/clip_fraction"),
        *("loss/policy", "loss/total", "loss", "lr", "grad_norm", "tokens_per_s"),
        *("time/generation_s", "time/scoring_s", "time/update_s"),
    ):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    for key in ("eval/score_mean", "eval/gold_score_mean"):
        eval_steps = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in eval_steps) == [0, 2, 3]
    alarm = client.get_metric_history(run.info.run_id, "overoptimisation/alarm")
    assert [m.value for m in alarm] == [metrics["overoptimisation/alarm"]]
    assert run.data.tags["overoptimisation.status"] == metrics["overoptimisation/status"]
    assert run.data.params["ppo.train.rollout_batch_size"] == "8"
    assert run.data.params["seed"] == "0"
    for name in ("prompts", "sft_model", "reward_model"):
        assert f"input.{name}.md5" in run.data.tags
    assert {d.dataset.name.split("@")[0] for d in run.inputs.dataset_inputs} == {
        "ppo_prompts_train",
        "ppo_prompts_eval",
    }
    model_id = run.data.tags["model.model.model_id"]  # the MLflow model wrapping the folder
    artifacts = {a.path for a in client.list_logged_model_artifacts(model_id, "artifacts/ppo")}
    assert {"artifacts/ppo/value_head.safetensors", "artifacts/ppo/model.safetensors"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/ppo_curves.png", "plots/ppo_curves.json"}


class SimulatedCrash(RuntimeError):
    """Stands in for a killed process."""


def test_a_killed_run_resumes_from_its_checkpoint_and_a_changed_config_starts_over(
    tiny_project, tiny_params, tracking_uri, monkeypatch
):
    paths = ProjectPaths(tiny_project)
    original_log_metrics = StageRun.log_metrics

    def crash_at_iteration_two(self, metrics, step):
        if step == 2 and "reward/score_mean" in metrics:
            raise SimulatedCrash
        original_log_metrics(self, metrics, step)

    monkeypatch.setattr(StageRun, "log_metrics", crash_at_iteration_two)
    with pytest.raises(SimulatedCrash):
        run_ppo(
            tiny_settings(), StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
        )
    assert [p.name for p in paths.checkpoints_dir("ppo").iterdir()] == ["step-00000001"]
    monkeypatch.setattr(StageRun, "log_metrics", original_log_metrics)

    changed = run_ppo(
        tiny_settings(learning_rate=5e-3),
        StageContext(tiny_params.data, 0, tiny_project, show_progress=False),
    )
    assert changed["resumed_from"] == 0  # another config never resumes a stale checkpoint

    monkeypatch.setattr(StageRun, "log_metrics", crash_at_iteration_two)
    with pytest.raises(SimulatedCrash):
        run_ppo(
            tiny_settings(), StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
        )
    monkeypatch.setattr(StageRun, "log_metrics", original_log_metrics)
    resumed = run_ppo(
        tiny_settings(), StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
    )
    assert resumed["resumed_from"] == 1 and resumed["iterations"] == ITERATIONS
    assert not paths.checkpoints_dir("ppo").exists()


def test_without_a_gold_judge_the_alarm_is_off_and_says_so(tiny_project, tiny_params, tracking_uri):
    # The tiny project's files, read as user data: no gold judge stands behind them.
    data = tiny_params.data.model_copy(update={"source": "files"})
    metrics = run_ppo(
        tiny_settings(checkpoint_every=0), StageContext(data, 0, tiny_project, show_progress=False)
    )
    assert "eval/gold_score_mean" not in metrics and "eval/score_mean" in metrics
    assert metrics["overoptimisation/alarm"] is None
    assert metrics["overoptimisation/status"] == NO_GOLD
    assert metrics["overoptimisation/gold_alpha"] is None
    assert metrics["overoptimisation/judge"] is None
    saved = json.loads(ProjectPaths(tiny_project).metrics_file("ppo").read_text())
    assert saved["overoptimisation/status"] == NO_GOLD


def test_missing_reward_model_is_a_clear_error(tiny_project, tiny_params, tracking_uri):
    import shutil

    shutil.rmtree(ProjectPaths(tiny_project).reward_model_dir)
    with pytest.raises(FileNotFoundError, match="reward_model input is missing"):
        run_ppo(tiny_settings(), StageContext(tiny_params.data, 0, tiny_project))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_eval_prompts": -1}, "max_eval_prompts"),
        ({"scorer_batch_size": 0}, "scorer_batch_size"),
        ({"overoptimisation_window": 1}, "overoptimisation_window"),
        ({"overoptimisation_epsilon": -0.1}, "overoptimisation_epsilon"),
        ({"train": {"iterations": 2}}, "PPOTrainSettings"),
    ],
)
def test_invalid_stage_settings_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOSettings(**kwargs)
