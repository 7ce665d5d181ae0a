"""The SFT stage and its task: completion-only loss with EOS, packing, accumulation, resume."""

import copy
import json
import shutil

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from tiny_models import model_and_split
from training_checks import assert_same_step, train_one_step

import rlhf_core.stages.sft as sft_stage
from rlhf_core.algorithms.logprobs import sft_loss, shift_for_causal_lm, token_logprobs
from rlhf_core.config import DataSettings
from rlhf_core.config.stages import SFTSettings
from rlhf_core.config.training import TrainSettings
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.sft import run_sft
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.training.loop import train
from rlhf_core.training.objectives.sft import (
    SFTObjective,
    collate_rows,
    pack_examples,
    tokenize_sft_rows,
)
from rlhf_core.training.tokenize import TokenizedCompletion, tokenize_completion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base_and_rows(tiny_project, tiny_params):
    """The tiny base model, its tokenizer, and the train / held-out SFT frames."""
    return model_and_split(tiny_project, "base", "sft", tiny_params.data.eval_fraction)


def _examples(tokenizer, frame, max_length=256):
    return tokenize_sft_rows(
        tokenizer, list(frame["prompt"]), list(frame["completion"]), max_length
    )


def _stage_settings(**train_overrides):
    train_settings = dict(
        learning_rate=1e-2, warmup_steps=1, epochs=2, batch_size=8, eval_every=3, checkpoint_every=2
    )
    return SFTSettings(
        train=TrainSettings(**{**train_settings, **train_overrides}),
        num_samples=2,
        sample_max_new_tokens=8,
    )


def _data(params):
    return DataSettings(eval_fraction=params.data.eval_fraction)


def test_loss_is_the_sum_of_completion_and_eos_nlls_even_when_pad_is_eos(base_and_rows):
    model, tokenizer, train_frame, _ = base_and_rows
    tokenizer.pad_token = tokenizer.eos_token  # padding now has the EOS id
    rows = train_frame.iloc[:3]
    examples = _examples(tokenizer, rows)
    task = SFTObjective(examples, [], tokenizer.pad_token_id)
    batch = task.collate([0, 1, 2])
    assert batch["input_ids"].shape[1] > min(map(len, examples))  # some rows are padded

    expected_units = sum(
        len(tokenizer.encode(c, add_special_tokens=False)) + 1 for c in rows["completion"]
    )
    assert task.units(batch) == expected_units  # completion + EOS, never the padding
    for row, example in enumerate(examples):
        eos_position = len(example) - 1
        assert example.input_ids[eos_position] == tokenizer.eos_token_id
        assert batch["target_mask"][row, eos_position] == 1
        assert batch["target_mask"][row, len(example) :].sum() == 0

    model.eval()
    loss, metrics = task.loss(model, batch)
    by_hand = 0.0
    for example in examples:  # each sequence alone, no padding at all
        input_ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        aligned = shift_for_causal_lm(logits, input_ids, torch.tensor([example.completion_mask]))
        by_hand -= float(token_logprobs(aligned[0], aligned[1], mask=aligned[2]).sum())
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean = sft_loss(*shift_for_causal_lm(logits, batch["input_ids"], batch["target_mask"]))
    assert float(loss) / task.units(batch) == pytest.approx(float(mean), rel=1e-5)
    assert 0 <= metrics["token_accuracy"] <= task.units(batch)


def test_packed_rows_match_examples_run_one_by_one(base_and_rows):
    model, tokenizer, train_frame, _ = base_and_rows
    rows = train_frame.iloc[:6]
    examples = _examples(tokenizer, rows)
    # An example without a prompt: its first completion token has nothing before it.
    examples.append(tokenize_completion(tokenizer, [], "A plain completion.", 256))
    max_length = 2 * max(map(len, examples))
    packed = SFTObjective(examples, [], tokenizer.pad_token_id, packing=True, max_length=max_length)
    plain = SFTObjective(examples, [], tokenizer.pad_token_id)
    assert len(packed.lengths) < len(examples)  # rows really hold several examples
    assert max(packed.lengths) <= max_length
    assert sorted(i for row in packed.rows for i in row) == list(range(len(examples)))

    model.eval()
    packed_batch = packed.collate(list(range(len(packed.lengths))))
    plain_batch = plain.collate(list(range(len(examples))))
    assert packed.units(packed_batch) == plain.units(plain_batch)
    packed_loss, packed_metrics = packed.loss(model, packed_batch)
    plain_loss, plain_metrics = plain.loss(model, plain_batch)
    # A token attending across an example boundary would change the loss far beyond this.
    assert float(packed_loss) == pytest.approx(float(plain_loss), rel=1e-5)
    assert packed_metrics == plain_metrics


def test_pack_examples_first_fit_decreasing():
    rows = pack_examples([5, 3, 4, 2, 6], max_length=8)
    assert rows == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="longer than the packing length"):
        pack_examples([9], max_length=8)


def test_collate_restarts_positions_and_never_targets_a_first_token(base_and_rows):
    tokenizer = base_and_rows[1]
    examples = [tokenize_completion(tokenizer, [], text, 64) for text in ("Good film.", "Bad.")]
    batch = collate_rows(examples, [[0, 1]], tokenizer.pad_token_id)
    first, second = len(examples[0]), len(examples[1])
    assert batch["position_ids"][0, :first].tolist() == list(range(first))
    assert batch["position_ids"][0, first:].tolist() == list(range(second))
    assert batch["target_mask"][0, 0] == 0 and batch["target_mask"][0, first] == 0
    assert int(batch["target_mask"].sum()) == first + second - 2


def test_gradient_accumulation_is_invariant_through_the_task(base_and_rows):
    """One batch of 8 and eight accumulated micro-batches of 1 make the same step."""
    model, tokenizer, train_frame, _ = base_and_rows
    task = SFTObjective(_examples(tokenizer, train_frame.iloc[:8]), [], tokenizer.pad_token_id)
    whole, accumulated = copy.deepcopy(model), copy.deepcopy(model)
    settings = TrainSettings(
        learning_rate=1e-2, batch_size=8, max_steps=1, warmup_steps=0, max_grad_norm=0.0
    )
    whole_grads = train_one_step(whole, task, settings)
    micro = TrainSettings(**{**settings.__dict__, "micro_batch_size": 1})
    accumulated_grads = train_one_step(accumulated, task, micro)
    assert_same_step(whole, accumulated, whole_grads, accumulated_grads, settings.learning_rate)
    for name, parameter in whole.named_parameters():  # every trainable parameter moved
        assert not torch.equal(parameter, dict(model.named_parameters())[name]), name


def test_held_out_loss_falls_on_a_learnable_toy(base_and_rows):
    model, tokenizer, train_frame, _ = base_and_rows
    examples = _examples(tokenizer, train_frame.iloc[:2])
    task = SFTObjective(examples * 4, examples, tokenizer.pad_token_id)
    model.eval()
    before = task.evaluate(model)
    settings = TrainSettings(learning_rate=1e-2, batch_size=4, epochs=15, warmup_steps=2)
    result = train(model, task, settings, show_progress=False)
    after = result.final_eval
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_token_accuracy"] > before["eval_token_accuracy"] + 0.3


def test_settings_reject_bad_values():
    for bad in (dict(max_length=1), dict(eval_batch_size=0), dict(num_samples=-1)):
        with pytest.raises(ValueError, match="sft\\."):
            SFTSettings(**bad)
    example = TokenizedCompletion(input_ids=[4, 9, 2], completion_mask=[0, 1, 1], prompt_length=1)
    with pytest.raises(ValueError, match="packing needs max_length"):
        SFTObjective([example], [], 0, packing=True)
    with pytest.raises(ValueError, match="no SFT training examples"):
        SFTObjective([], [example], 0)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_run_sft_trains_saves_and_tracks_everything(
    tiny_project, tiny_params, monkeypatch, mlflow_uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    paths = ProjectPaths(tiny_project)
    settings = _stage_settings()
    metrics = run_sft(
        settings, StageContext(_data(tiny_params), 0, tiny_project, show_progress=False)
    )

    # Every parameter of the saved model moved away from the base model.
    base = load_file(str(paths.base_model_dir / "model.safetensors"))
    tuned = load_file(str(paths.sft_model_dir / "model.safetensors"))
    assert set(base) == set(tuned)
    for name in base:
        assert not torch.equal(base[name], tuned[name]), name
    load_causal_lm(str(paths.sft_model_dir))  # a loadable causal LM + tokenizer

    on_disk = json.loads(paths.metrics_file("sft").read_text())
    assert on_disk == pytest.approx(metrics)
    assert metrics["steps"] == 2 * -(-metrics["train_examples"] // 8)
    assert 0 < metrics["eval_loss"] < 10 and 0 <= metrics["eval_token_accuracy"] <= 1
    assert metrics["resumed_from"] == 0
    assert metrics["truncated_ends"] == 0  # every demo example fits max_length
    curves = json.loads((paths.plots_dir / "sft_curves.json").read_text())
    assert [row["step"] for row in curves] == list(range(1, metrics["steps"] + 1))
    assert (paths.plots_dir / "sft_curves.png").stat().st_size > 0
    assert not paths.checkpoints_dir("sft").exists()

    run_id = read_producer_run_id(paths.sft_model_dir)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["sft.train.learning_rate"] == "0.01"
    assert run.data.params["seed"] == "0" and "data.eval_fraction" in run.data.params
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "token_accuracy"):
        history = client.get_metric_history(run_id, key)
        assert len(history) == metrics["steps"], key
    assert len(client.get_metric_history(run_id, "eval/loss")) >= 2
    tags = run.data.tags
    assert tags["input.sft.md5"].endswith(".dir") and tags["input.base_model.md5"]
    assert tags["git_commit"] and tags["resumed_from"] == "0"
    datasets = {i.dataset.name.split("@")[0] for i in run.inputs.dataset_inputs}
    assert datasets == {"sft_train", "sft_eval"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples.json", "plots", "metrics"} <= artifacts
    assert client.get_logged_model(tags["model.model.model_id"]).source_run_id == run_id


class Crash(RuntimeError):
    pass


def test_kill_and_resume_equals_the_uninterrupted_run(
    tiny_project, tiny_params, monkeypatch, tmp_path, mlflow_uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    other = shutil.copytree(tiny_project, tmp_path / "uninterrupted")
    settings = _stage_settings(epochs=1.5, eval_every=0)
    reference = run_sft(settings, StageContext(_data(tiny_params), 0, other, show_progress=False))

    original_loss = sft_stage.SFTObjective.loss
    calls = []

    def crash_at_step_6(self, model, batch):
        calls.append(1)
        if len(calls) == 6:  # one micro-batch per step: the 6th call is step 6
            raise Crash
        return original_loss(self, model, batch)

    monkeypatch.setattr(sft_stage.SFTObjective, "loss", crash_at_step_6)
    with pytest.raises(Crash):
        run_sft(settings, StageContext(_data(tiny_params), 0, tiny_project, show_progress=False))
    saved = sorted(p.name for p in ProjectPaths(tiny_project).checkpoints_dir("sft").iterdir())
    assert saved == ["step-00000002", "step-00000004"]

    monkeypatch.setattr(sft_stage.SFTObjective, "loss", original_loss)
    resumed = run_sft(
        settings, StageContext(_data(tiny_params), 0, tiny_project, show_progress=False)
    )
    assert resumed["resumed_from"] == 4 and reference["resumed_from"] == 0
    for key in ("eval_loss", "eval_token_accuracy", "train_loss", "steps"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
    paths = ProjectPaths(tiny_project)
    run_id = read_producer_run_id(paths.sft_model_dir)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags["resumed_from"] == "4"
    # The curves file and the resumed run's MLflow history hold every step, not only 5 on.
    curves = json.loads((paths.plots_dir / "sft_curves.json").read_text())
    assert [row["step"] for row in curves] == list(range(1, reference["steps"] + 1))
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, reference["steps"] + 1))


def test_a_code_change_of_the_stage_means_no_resume(
    tiny_project, tiny_params, monkeypatch, mlflow_uri
):
    """The checkpoint fingerprint holds the md5s of the stage's code deps in dvc.yaml: DVC
    reruns the stage when they change, and the rerun starts over instead of resuming weights
    made by the old code."""
    import yaml

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    helper = tiny_project / "code" / "sft_helper.py"
    helper.parent.mkdir()
    helper.write_text("SCALE = 1\n")
    sft_entry = {
        "cmd": "rlhf stage sft",
        "deps": ["code/sft_helper.py", "data/validated/sft", "artifacts/base"],
        "outs": ["artifacts/sft"],
    }
    (tiny_project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sft": sft_entry}}))
    settings = _stage_settings(epochs=1.5, eval_every=0)
    context = StageContext(_data(tiny_params), 0, tiny_project, show_progress=False)
    original_loss = sft_stage.SFTObjective.loss
    calls = []

    def crash_at_step_6(self, model, batch):
        calls.append(1)
        if len(calls) == 6:
            raise Crash
        return original_loss(self, model, batch)

    monkeypatch.setattr(sft_stage.SFTObjective, "loss", crash_at_step_6)
    with pytest.raises(Crash):
        run_sft(settings, context)
    monkeypatch.setattr(sft_stage.SFTObjective, "loss", original_loss)
    helper.write_text("SCALE = 2\n")  # the code changed: DVC reruns the stage
    assert run_sft(settings, context)["resumed_from"] == 0
