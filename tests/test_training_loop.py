"""The shared training loop: schedule, batching, accumulation, checkpoints and resume."""

import math

import pytest
import torch

from rlhf_core.config.training import TrainSettings
from rlhf_core.training.batching import plan_epoch, split_micro_batches
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import total_steps, train
from rlhf_core.training.schedule import lr_multiplier


class SequenceRegression:
    """Toy task with variable-length examples: per-token squared error, units = tokens."""

    def __init__(self, num_examples=24, dim=4, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.lengths = [int(x) for x in torch.randint(1, 6, (num_examples,), generator=generator)]
        self.inputs = [torch.randn(n, dim, generator=generator) for n in self.lengths]
        target_map = torch.randn(dim, 1, generator=generator)
        self.targets = [x @ target_map for x in self.inputs]
        self.eval_calls = 0

    def collate(self, indices):
        width = max(self.lengths[i] for i in indices)
        x = torch.zeros(len(indices), width, self.inputs[0].shape[1])
        y = torch.zeros(len(indices), width, 1)
        mask = torch.zeros(len(indices), width)
        for row, i in enumerate(indices):
            n = self.lengths[i]
            x[row, :n], y[row, :n], mask[row, :n] = self.inputs[i], self.targets[i], 1
        return {"x": x, "y": y, "mask": mask}

    def units(self, batch):
        return int(batch["mask"].sum())

    def tokens(self, batch):
        return int(batch["mask"].sum())

    def loss(self, model, batch):
        error = ((model(batch["x"]) - batch["y"]).squeeze(-1) ** 2) * batch["mask"]
        return error.sum(), {"abs_error": float(error.detach().sqrt().sum())}

    def evaluate(self, model):
        self.eval_calls += 1
        batch = self.collate(list(range(len(self.lengths))))
        loss, _ = self.loss(model, batch)
        return {"eval_loss": float(loss) / self.units(batch)}


def _model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)
    )


def _settings(**overrides):
    base = dict(learning_rate=0.05, warmup_steps=1, batch_size=8, epochs=2, seed=3)
    return TrainSettings(**{**base, **overrides})


def test_lr_schedule_values_by_hand():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(70, 100, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="cosine"):
        lr_multiplier(0, 10, 0, "step")


def test_epoch_plan_is_a_seeded_permutation_grouped_by_length():
    lengths = [1 + (i * 7) % 13 for i in range(100)]
    plan = plan_epoch(lengths, 10, seed=1, epoch=0)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(100))
    assert plan == plan_epoch(lengths, 10, seed=1, epoch=0)
    assert plan != plan_epoch(lengths, 10, seed=1, epoch=1)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    random_plan = plan_epoch(lengths, 10, seed=1, epoch=0, group_by_length=False)
    random_padded = sum(len(b) * max(lengths[i] for i in b) for b in random_plan)
    assert padded < random_padded  # grouping really removes padding


def test_micro_batches_respect_size_and_token_limits():
    lengths = [10, 2, 2, 2, 2, 9, 1, 1]
    indices = list(range(8))
    micro = split_micro_batches(indices, lengths, micro_batch_size=3)
    assert sorted(i for m in micro for i in m) == indices and max(map(len, micro)) == 3
    dynamic = split_micro_batches(indices, lengths, max_tokens=20)
    assert sorted(i for m in dynamic for i in m) == indices
    for m in dynamic:
        assert len(m) * max(lengths[i] for i in m) <= 20 or len(m) == 1
    assert len(dynamic[-1]) > len(dynamic[0])  # short sequences travel in bigger batches


def test_loss_goes_down_and_every_parameter_changes():
    task = SequenceRegression()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, task, _settings(epochs=10), show_progress=False)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.final_eval["eval_loss"] < result.history[0]["loss"]
    for name, value in model.state_dict().items():
        assert not torch.equal(value, before[name]), name
    assert result.global_step == total_steps(_settings(epochs=10), 24) == 30
    assert result.tokens == 10 * sum(task.lengths)


def test_gradient_accumulation_is_invariant():
    """One batch of 8 == eight accumulated micro-batches of 1 (the loss is per token)."""
    task = SequenceRegression(num_examples=8)
    whole, accumulated = _model(), _model()
    settings = _settings(max_steps=1, warmup_steps=0, max_grad_norm=0.0)
    train(whole, task, settings, show_progress=False)
    train(
        accumulated,
        task,
        TrainSettings(**{**settings.__dict__, "micro_batch_size": 1}),
        show_progress=False,
    )
    for a, b in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Crash(RuntimeError):
    pass


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path):
    task = SequenceRegression()
    settings = _settings(epochs=3, checkpoint_every=2, keep_checkpoints=2)
    # Dropout makes the result depend on the RNG state, which the checkpoint must restore.
    reference = _model(dropout=0.3)
    reference_result = train(reference, task, settings, show_progress=False)

    manager = CheckpointManager(tmp_path / "ckpt", keep=2, fingerprint="run-a")
    interrupted = _model(dropout=0.3)

    def crash_at_step_5(step, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(
            interrupted,
            task,
            settings,
            checkpoints=manager,
            on_log=crash_at_step_5,
            show_progress=False,
        )
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000004"]

    resumed = _model(seed=99, dropout=0.3)  # different init: everything must come from disk
    logged = []
    result = train(
        resumed,
        task,
        settings,
        checkpoints=manager,
        on_log=lambda step, metrics: logged.append((step, metrics["loss"])),
        show_progress=False,
    )
    assert result.resumed_from == 4
    # The curves continue across the resume: steps 1-4 from the checkpoint, replayed to the
    # logger (MLflow), then the rest, equal to the uninterrupted run's.
    steps = reference_result.global_step
    assert [row["step"] for row in result.history] == list(range(1, steps + 1))
    assert [step for step, _ in logged] == list(range(1, steps + 1))
    for row, expected in zip(result.history, reference_result.history, strict=True):
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert result.global_step == reference_result.global_step
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert result.final_eval["eval_loss"] == pytest.approx(
        reference_result.final_eval["eval_loss"], rel=1e-6
    )
    assert result.history[-1]["loss"] == pytest.approx(reference_result.history[-1]["loss"])


def _damage(checkpoint, how):
    if how == "truncated weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        return "model.safetensors has"
    if how == "flipped optimizer byte":
        state = checkpoint / "optimizer.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        return "optimizer.pt does not match its sha256"
    (checkpoint / "manifest.json").unlink()
    return "it has no manifest.json"


@pytest.mark.parametrize("how", ["truncated weights", "flipped optimizer byte", "no manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, how):
    task = SequenceRegression()
    settings = _settings(epochs=3, checkpoint_every=2, keep_checkpoints=2)
    reference = _model(dropout=0.3)
    train(reference, task, settings, show_progress=False)
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, fingerprint="run-a")

    def crash_at_step_5(step, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(
            _model(dropout=0.3),
            task,
            settings,
            checkpoints=manager,
            on_log=crash_at_step_5,
            show_progress=False,
        )
    older, newest = manager.checkpoints()
    said = _damage(newest, how)

    resumed = _model(seed=99, dropout=0.3)
    with caplog.at_level("WARNING", logger="rlhf_core.training.checkpoint"):
        result = train(resumed, task, settings, checkpoints=manager, show_progress=False)
    assert result.resumed_from == 2 and older.name == "step-00000002"
    assert f"skipping checkpoint {newest}: {said}" in caplog.text
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpoints_are_pruned_atomic_and_fingerprinted(tmp_path):
    task = SequenceRegression()
    manager = CheckpointManager(tmp_path, keep=2, fingerprint="a")
    train(
        _model(),
        task,
        _settings(epochs=3, checkpoint_every=1),
        checkpoints=manager,
        show_progress=False,
    )
    names = [p.name for p in manager.checkpoints()]
    assert len(names) == 2 and names[-1] == "step-00000008"
    (tmp_path / ".writing-crashed").mkdir()  # a half-written checkpoint is never picked
    (tmp_path / "step-00000099").mkdir()  # nor one without its state file
    assert manager.latest().name == "step-00000008"
    other = CheckpointManager(tmp_path, keep=2, fingerprint="b")
    assert other.latest() is None


def _diverging(task, at_call: int, how: str):
    """`task` whose loss turns non-finite at its `at_call`-th call: "loss" makes the loss NaN,
    "gradient" keeps the loss finite and makes the gradient NaN (d/dw sqrt((0 w)^2) = 0/0)."""
    original, calls = task.loss, []

    def loss(model, batch):
        calls.append(1)
        value, metrics = original(model, batch)
        if len(calls) == at_call:
            if how == "loss":
                value = value * float("nan")
            else:
                value = value + (model[0].weight * 0.0).pow(2).sum().sqrt()
        return value, metrics

    task.loss = loss
    return task


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training_before_the_update(tmp_path, how):
    from rlhf_core.training.divergence import TrainingDivergedError

    task = _diverging(SequenceRegression(), at_call=3, how=how)  # one micro-batch per step
    model = _model()
    manager = CheckpointManager(tmp_path / "ckpt", keep=5, fingerprint="nan")
    after_step: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(step, metrics):
        after_step[step] = {k: v.clone() for k, v in model.state_dict().items()}

    settings = _settings(epochs=3, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as error:
        train(model, task, settings, checkpoints=manager, on_log=snapshot, show_progress=False)
    message = str(error.value)
    what = "loss" if how == "loss" else "gradient norm"
    assert "train optimizer step 3 of 9" in message and f"the {what} is nan" in message
    assert "examples " in message and "no model is written" in message
    # Stopped at once: no update, no log and no checkpoint of step 3; the weights are step 2's.
    assert sorted(after_step) == [1, 2]
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step[2][name]) and torch.isfinite(value).all(), name
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002"]


def test_eval_every_and_callbacks():
    task = SequenceRegression()
    logged, evaluated = [], []
    train(
        _model(),
        task,
        _settings(epochs=2, eval_every=2),
        on_log=lambda s, m: logged.append(s),
        on_eval=lambda s, m: evaluated.append(s),
        show_progress=False,
    )
    assert logged == [1, 2, 3, 4, 5, 6]
    assert evaluated == [2, 4, 6]


@pytest.mark.parametrize(
    "bad",
    [
        dict(learning_rate=0),
        dict(schedule="step"),
        dict(mixed_precision="fp8"),
        dict(mixed_precision="no"),  # accelerate's name; ours is fp32 (YAML 1.1 reads no as False)
        dict(batch_size=0),
        dict(epochs=0),
    ],
)
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ValueError):
        TrainSettings(**bad)


def test_total_steps():
    assert total_steps(TrainSettings(batch_size=8, epochs=1.5), 20) == math.ceil(1.5 * 3)
    assert total_steps(TrainSettings(batch_size=8, max_steps=7), 20) == 7
