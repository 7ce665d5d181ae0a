"""The DPO stage and its task: pairs in one forward pass, a cached reference, every loss type."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import model_and_split

import rlhf_core.stages.dpo as dpo_stage
import rlhf_core.stages.training_stage as training_stage
from rlhf_core.algorithms.logprobs import sequence_logprobs, shift_for_causal_lm
from rlhf_core.algorithms.preference import dpo_loss, simpo_loss
from rlhf_core.config import DataSettings
from rlhf_core.config.stages import DPOSettings, LoraSettings
from rlhf_core.config.training import TrainSettings
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.dpo import run_dpo
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.training.loop import train
from rlhf_core.training.objectives.preference import (
    PreferenceObjective,
    collate_pairs,
    completion_logp_sums,
    preference_outputs,
    reference_logps,
    tokenize_pairs,
)

BETA = 0.1


@pytest.fixture
def sft_and_pairs(tiny_project, tiny_params):
    """The tiny project's SFT model, tokenizer and its train / held-out tokenized pairs."""
    model, tokenizer, train_frame, eval_frame = model_and_split(
        tiny_project, "sft", "preference", tiny_params.data.eval_fraction
    )

    def pairs(part):
        return tokenize_pairs(
            tokenizer, list(part["prompt"]), list(part["chosen"]), list(part["rejected"]), 256
        )

    return model, tokenizer, pairs(train_frame), pairs(eval_frame)


def _settings(**overrides):
    base = dict(learning_rate=1e-2, warmup_steps=0, batch_size=8, max_steps=1, seed=0)
    return TrainSettings(**{**base, **overrides})


def _loss(loss_type="sigmoid", beta=BETA, **knobs):
    """Section settings for a loss; RPO off unless asked for (the section's default is 0.5)."""
    return DPOSettings(loss_type=loss_type, beta=beta, **{"rpo_alpha": 0.0, **knobs})


def _task(objective, model, pad_id, train_pairs, eval_pairs=()):
    reference = None
    if objective.needs_reference:
        reference = reference_logps(model, [*train_pairs, *eval_pairs], pad_id, batch_size=16)
    return PreferenceObjective(
        objective.pair_loss(),
        train_pairs,
        pad_id,
        train_reference=None if reference is None else reference[: len(train_pairs)],
        eval_pairs=eval_pairs,
        eval_reference=None if reference is None else reference[len(train_pairs) :],
    )


def _count_forwards(module):
    """Rows of each forward pass of `module` (a pass per length bucket of a micro-batch)."""
    calls = []

    def record(_module, args, kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape[0])

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    return calls, handle


def _direct_logp(model, tokenized):
    """Summed completion log-prob of one sequence run alone (no batch, no padding)."""
    input_ids = torch.tensor([tokenized.input_ids])
    mask = torch.tensor([tokenized.completion_mask])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return sequence_logprobs(*shift_for_causal_lm(logits, input_ids, mask))[0]


# --------------------------------------------------------------------------------------------
# Settings and data
# --------------------------------------------------------------------------------------------


def test_settings_resolve_length_normalisation_per_loss_type_and_reject_bad_values():
    assert not DPOSettings().length_normalised
    assert DPOSettings(loss_type="ipo").length_normalised
    assert DPOSettings(loss_type="simpo", beta=2.0).length_normalised
    assert DPOSettings(loss_type="ipo", average_logprobs=False).length_normalised is False
    for bad in (
        dict(loss_type="kto"),
        dict(beta=0.0),
        dict(loss_type="ipo", label_smoothing=0.1),
        dict(loss_type="simpo", average_logprobs=False),
        dict(rpo_alpha=-1.0),
        dict(max_length=1),
        dict(inference_batch_size=0),
    ):
        with pytest.raises(ValueError):
            DPOSettings(**bad)
    with pytest.raises(ValueError, match=r"lora\.r"):
        LoraSettings(r=0)


def test_pairs_share_the_prompt_and_collate_chosen_rows_before_rejected(sft_and_pairs):
    _, tokenizer, pairs, _ = sft_and_pairs
    batch = collate_pairs(pairs[:3], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, pair in enumerate(pairs[:3]):
        prompt = pair.chosen.input_ids[: pair.chosen.prompt_length]
        assert pair.rejected.input_ids[: pair.rejected.prompt_length] == prompt
        for row, sequence in ((i, pair.chosen), (3 + i, pair.rejected)):
            n = len(sequence)
            assert batch["input_ids"][row, :n].tolist() == sequence.input_ids
            assert batch["attention_mask"][row].sum() == n
            assert batch["completion_mask"][row, n - 1] == 1  # the EOS is a target
            assert sequence.input_ids[-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------
# Reference pass and forward passes
# --------------------------------------------------------------------------------------------


def test_reference_logps_run_once_in_batches_and_equal_a_direct_computation(sft_and_pairs):
    model, tokenizer, pairs, _ = sft_and_pairs
    calls, handle = _count_forwards(model)
    cached = reference_logps(model, pairs, tokenizer.pad_token_id, batch_size=16)
    handle.remove()
    assert sum(calls) == 2 * len(pairs)  # every sequence once
    assert max(calls) <= 2 * 16 and len(calls) >= math.ceil(len(pairs) / 16)
    assert cached.shape == (len(pairs), 2)
    for i in (0, len(pairs) // 2, len(pairs) - 1):
        torch.testing.assert_close(
            cached[i, 0], _direct_logp(model, pairs[i].chosen), atol=1e-4, rtol=1e-5
        )
        torch.testing.assert_close(
            cached[i, 1], _direct_logp(model, pairs[i].rejected), atol=1e-4, rtol=1e-5
        )


def test_training_runs_one_policy_forward_per_micro_batch_and_never_the_reference(sft_and_pairs):
    policy, tokenizer, pairs, eval_pairs = sft_and_pairs
    reference, _ = load_causal_lm(policy.name_or_path)  # a second copy of the SFT model
    reference_calls, reference_handle = _count_forwards(reference)
    cached = reference_logps(reference, [*pairs, *eval_pairs], tokenizer.pad_token_id, 64)
    calls_before_training = len(reference_calls)
    task = PreferenceObjective(
        _loss().pair_loss(),
        pairs,
        tokenizer.pad_token_id,
        train_reference=cached[: len(pairs)],
        eval_pairs=eval_pairs,
        eval_reference=cached[len(pairs) :],
        eval_batch_size=64,
    )
    policy_calls, policy_handle = _count_forwards(policy)
    settings = _settings(max_steps=2, micro_batch_size=3)
    train(policy, task, settings, show_progress=False)
    policy_handle.remove()
    reference_handle.remove()
    # Each step's pairs once (chosen + rejected rows), then the held-out pairs once.
    assert sum(policy_calls) == 2 * (2 * settings.batch_size) + 2 * len(eval_pairs)
    assert sum(reference_calls) == 2 * (len(pairs) + len(eval_pairs))
    assert len(reference_calls) == calls_before_training


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective, expected",
    [
        (_loss("sigmoid"), math.log(2.0)),
        (_loss("sigmoid", label_smoothing=0.2), math.log(2.0)),
        (_loss("ipo"), (1 / (2 * BETA)) ** 2),
        (_loss("hinge"), 1.0),
    ],
    ids=["sigmoid", "conservative", "ipo", "hinge"],
)
def test_step_zero_loss_is_the_core_formula_at_policy_equals_reference(
    sft_and_pairs, objective, expected
):
    model, tokenizer, pairs, _ = sft_and_pairs
    task = _task(objective, model, tokenizer.pad_token_id, pairs[:8])
    result = train(model, task, _settings(), show_progress=False)
    zero = torch.zeros(1)
    core, _, _ = dpo_loss(
        zero, zero, zero, zero, BETA, objective.loss_type, objective.label_smoothing
    )
    assert result.history[0]["loss"] == pytest.approx(float(core), abs=1e-4)
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-4)
    assert result.history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert result.history[0]["rewards/accuracies"] <= 0.5  # ties count as wrong


def test_simpo_needs_no_reference_and_its_step_zero_loss_is_the_core_formula(sft_and_pairs):
    model, tokenizer, pairs, _ = sft_and_pairs
    objective = _loss("simpo", beta=2.0)
    calls, handle = _count_forwards(model)
    task = _task(objective, model, tokenizer.pad_token_id, pairs)
    assert task.reference is None and not calls  # no reference pass at all
    handle.remove()
    batch_indices = list(range(8))
    chosen = torch.stack([_direct_logp(model, pairs[i].chosen) for i in batch_indices])
    rejected = torch.stack([_direct_logp(model, pairs[i].rejected) for i in batch_indices])
    chosen_n = torch.tensor([float(sum(pairs[i].chosen.completion_mask)) for i in batch_indices])
    rejected_n = torch.tensor(
        [float(sum(pairs[i].rejected.completion_mask)) for i in batch_indices]
    )
    expected, _, _ = simpo_loss(chosen, rejected, chosen_n, rejected_n, beta=2.0)
    loss, metrics = task.loss(model, task.collate(batch_indices))
    assert float(loss.detach()) / 8 == pytest.approx(float(expected.mean()), rel=1e-4)
    assert metrics["logps/chosen"] / 8 == pytest.approx(float((chosen / chosen_n).mean()), rel=1e-4)


def test_rpo_adds_alpha_times_the_token_mean_nll_of_the_chosen_response():
    logp_sums = torch.tensor([[-12.0, -30.0], [-20.0, -10.0]])  # (2, pairs): chosen row first
    counts = torch.tensor([[4, 10], [5, 2]])
    reference = torch.tensor([[-11.0, -31.0], [-19.0, -12.0]])
    plain = preference_outputs(_loss().pair_loss(), logp_sums, counts, reference)
    with_rpo = preference_outputs(_loss(rpo_alpha=0.5).pair_loss(), logp_sums, counts, reference)
    token_mean_nll = torch.tensor([12.0 / 4, 30.0 / 10])
    torch.testing.assert_close(with_rpo.losses - plain.losses, 0.5 * token_mean_nll)
    torch.testing.assert_close(with_rpo.chosen_rewards, plain.chosen_rewards)


def test_rpo_keeps_the_chosen_likelihood_higher_than_plain_dpo(sft_and_pairs):
    model, tokenizer, pairs, _ = sft_and_pairs
    chosen_logps = {}
    for alpha in (0.0, 1.0):
        policy, _ = load_causal_lm(model.name_or_path)
        task = _task(_loss(rpo_alpha=alpha), policy, tokenizer.pad_token_id, pairs[:8])
        train(policy, task, _settings(max_steps=3, learning_rate=3e-3), show_progress=False)
        with torch.no_grad():
            sums, _ = completion_logp_sums(policy, task.collate(list(range(8))))
        chosen_logps[alpha] = float(sums[0].mean())
    assert chosen_logps[1.0] > chosen_logps[0.0] + 1.0


# --------------------------------------------------------------------------------------------
# Training behaviour
# --------------------------------------------------------------------------------------------


def test_gradient_accumulation_is_invariant(sft_and_pairs):
    """Micro-batches of 3 + 3 + 2 pairs give the gradient of one batch of 8 (loss per pair)."""
    model, tokenizer, pairs, _ = sft_and_pairs
    task = _task(_loss(rpo_alpha=0.3), model, tokenizer.pad_token_id, pairs[:8])

    def gradients(micro_batches):
        model.zero_grad(set_to_none=True)
        units = sum(len(indices) for indices in micro_batches)
        for indices in micro_batches:
            loss, _ = task.loss(model, task.collate(indices))
            (loss / units).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = gradients([list(range(8))])
    accumulated = gradients([[0, 1, 2], [3, 4, 5], [6, 7]])
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-4 for g in whole)  # the comparison is not vacuous


def test_dpo_learns_a_fixed_token_preference(sft_and_pairs):
    """Chosen and rejected differ only in one word: margins and held-out accuracy rise."""
    model, tokenizer, _, _ = sft_and_pairs
    prompts = [[{"role": "user", "content": f"Review film number {i}."}] for i in range(40)]
    pairs = tokenize_pairs(
        tokenizer, prompts, ["The film was great."] * 40, ["The film was awful."] * 40, 256
    )
    task = _task(_loss(beta=0.5), model, tokenizer.pad_token_id, pairs[:32], pairs[32:])
    assert task.evaluate(model)["rewards/accuracies"] == 0.0  # all ties at the start
    result = train(model, task, _settings(max_steps=8, learning_rate=5e-3), show_progress=False)
    margins = [row["rewards/margins"] for row in result.history]
    assert margins[-1] > margins[0] + 0.5
    assert result.final_eval["rewards/accuracies"] == 1.0
    assert result.final_eval["loss"] < math.log(2.0)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _stage_settings(max_steps=None, **overrides):
    train_settings = TrainSettings(
        learning_rate=1e-2,
        warmup_steps=1,
        batch_size=8,
        epochs=1.0,
        max_steps=max_steps,
        checkpoint_every=2,
    )
    return DPOSettings(**{"train": train_settings, "max_length": 256, **overrides})


def _data(tiny_params):
    return DataSettings(eval_fraction=tiny_params.data.eval_fraction)


def test_run_dpo_trains_saves_and_tracks_everything(tiny_project, tiny_params, mlflow_store):
    from mlflow import MlflowClient

    paths = ProjectPaths(tiny_project)
    metrics = run_dpo(
        _stage_settings(), StageContext(_data(tiny_params), 0, tiny_project, show_progress=False)
    )
    sft = load_file(str(paths.sft_model_dir / "model.safetensors"))
    policy = load_file(str(paths.policy_dir("dpo") / "model.safetensors"))
    assert sft.keys() == policy.keys()
    unchanged = [name for name in sft if torch.equal(sft[name], policy[name])]
    assert not unchanged  # every trainable parameter moved
    load_causal_lm(str(paths.policy_dir("dpo")))
    assert read_producer_run_id(paths.policy_dir("dpo")) is not None  # marker beside it
    assert not paths.checkpoints_dir("dpo").exists()

    written = json.loads(paths.metrics_file("dpo").read_text())
    assert written["steps"] == metrics["steps"] == math.ceil(metrics["train_pairs"] / 8)
    assert {"eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"} <= set(written)
    assert "eval/step" not in written
    curves = json.loads((paths.plots_dir / "dpo_curves.json").read_text())
    assert len(curves) == metrics["steps"] and "rewards/margins" in curves[0]
    assert (paths.plots_dir / "dpo_curves.png").stat().st_size > 0

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`output.artifacts/policy/dpo.path` = '{paths.policy_dir('dpo')}'",
    )
    (run,) = runs
    logged = set(run.data.metrics)
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= logged
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert name in logged and f"eval/{name}" in logged
    assert {"logps/chosen", "logps/rejected"} <= logged
    assert len(client.get_metric_history(run.info.run_id, "loss")) == metrics["steps"]
    assert run.data.params["dpo.beta"] == "0.1" and run.data.params["seed"] == "0"
    contexts = {
        tag.value
        for dataset_input in run.inputs.dataset_inputs
        for tag in dataset_input.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"training", "evaluation"}
    for name in ("preference", "sft_model"):
        assert run.data.tags[f"input.{name}.md5"]
    assert run.data.tags["output.artifacts/policy/dpo.md5"]
    model_id = run.data.tags["model.model.model_id"]  # the MLflow model wrapping the folder
    artifacts = {a.path for a in client.list_logged_model_artifacts(model_id, "artifacts/dpo")}
    assert "artifacts/dpo/model.safetensors" in artifacts


def test_simpo_stage_skips_the_reference_pass(tiny_project, tiny_params, mlflow_store, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("SimPO must not compute reference log-probs")

    monkeypatch.setattr(dpo_stage, "reference_logps", no_reference)
    metrics = run_dpo(
        _stage_settings(max_steps=2, loss_type="simpo", beta=2.0),
        StageContext(_data(tiny_params), 0, tiny_project, show_progress=False),
    )
    assert math.isfinite(metrics["eval/loss"])


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_kill_and_resume_equals_the_uninterrupted_run(
    tiny_project, tiny_project_template, tiny_params, mlflow_store, monkeypatch, tmp_path
):
    uninterrupted = shutil.copytree(tiny_project_template, tmp_path / "uninterrupted")
    settings = _stage_settings()
    expected = run_dpo(
        settings, StageContext(_data(tiny_params), 0, uninterrupted, show_progress=False)
    )

    real_train = training_stage.train

    def train_then_crash(*args, on_log, **kwargs):
        def log_and_crash(step, metrics):
            on_log(step, metrics)
            if step == 3:
                raise Crash

        return real_train(*args, on_log=log_and_crash, **kwargs)

    monkeypatch.setattr(training_stage, "train", train_then_crash)
    with pytest.raises(Crash):
        run_dpo(settings, StageContext(_data(tiny_params), 0, tiny_project, show_progress=False))
    paths = ProjectPaths(tiny_project)
    assert paths.checkpoints_dir("dpo").is_dir()
    monkeypatch.setattr(training_stage, "train", real_train)
    resumed = run_dpo(
        settings, StageContext(_data(tiny_params), 0, tiny_project, show_progress=False)
    )

    assert resumed["resumed_from"] == 2 and resumed["steps"] == expected["steps"]
    assert resumed["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-5)
    a = load_file(str(ProjectPaths(uninterrupted).policy_dir("dpo") / "model.safetensors"))
    b = load_file(str(paths.policy_dir("dpo") / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_changed_settings_never_resume_a_stale_checkpoint(tiny_project, tiny_params):
    paths = ProjectPaths(tiny_project)
    inputs = {"preference": paths.validated_set("preference"), "sft_model": paths.sft_model_dir}
    data = _data(tiny_params)
    base = training_stage.run_fingerprint(_stage_settings(), data, 0, inputs)
    assert base == training_stage.run_fingerprint(_stage_settings(), data, 0, inputs)
    assert base != training_stage.run_fingerprint(_stage_settings(beta=0.2), data, 0, inputs)
    assert base != training_stage.run_fingerprint(_stage_settings(), data, 1, inputs)


def test_lora_saves_a_merged_model_and_its_adapter(tiny_project, tiny_params, mlflow_store):
    import peft

    paths = ProjectPaths(tiny_project)
    lora = LoraSettings(enabled=True, r=4, alpha=8.0)
    metrics = run_dpo(
        _stage_settings(max_steps=2, lora=lora),
        StageContext(_data(tiny_params), 0, tiny_project, show_progress=False),
    )
    out = paths.policy_dir("dpo")
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = Path(adapter_config["base_model_name_or_path"])
    assert base.is_absolute() and base == paths.sft_model_dir.resolve()
    sft = load_file(str(paths.sft_model_dir / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    changed = {name for name in sft if not torch.equal(sft[name], merged[name])}
    assert changed and all(name.split(".")[-2] in lora.target_modules for name in changed)
    assert metrics["trainable_parameters"] < sum(t.numel() for t in sft.values()) / 5

    # The merged weights behave exactly like SFT + adapter.
    merged_model, tokenizer = load_causal_lm(str(out))
    sft_model, _ = load_causal_lm(str(paths.sft_model_dir))
    adapted = peft.PeftModel.from_pretrained(sft_model, str(out / "adapter"))
    ids = torch.tensor([tokenizer.encode("the film was great")])
    with torch.no_grad():
        torch.testing.assert_close(
            merged_model(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4
        )


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ValueError, match=r"pip install 'rlhf-pipeline\[lora\]'"):
        dpo_stage.apply_lora(torch.nn.Linear(2, 2), LoraSettings(enabled=True))
