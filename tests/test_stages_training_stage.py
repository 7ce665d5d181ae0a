"""The shared skeleton of the training stages: its warnings about real-model pitfalls."""

import logging

from rlhf_core.config.stages import DPOSettings
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import TrainingStage, learning_rate_warning
from rlhf_core.training.tokenize import join_truncated


def test_a_from_scratch_learning_rate_on_a_pretrained_model_is_warned_about():
    warning = learning_rate_warning("sft", 134_500_000, 5e-3)
    assert warning is not None
    assert warning.startswith("sft: learning rate 0.005 on a 134M-parameter model")
    assert learning_rate_warning("sft", 134_500_000, 2e-5) is None  # a fine-tuning rate
    assert learning_rate_warning("sft", 900_000, 5e-3) is None  # the demo's own model


def test_responses_that_lost_their_eos_are_counted_and_named(tmp_path, caplog):
    stage = TrainingStage(
        name="dpo",
        settings=DPOSettings(max_length=5),
        context=StageContext(data=None, seed=0, root=tmp_path),
        paths=None,
        run=None,
        fingerprint="",
    )
    sequences = [
        join_truncated([1, 2], [3, 99], 5),
        join_truncated([1, 2, 3, 4], [5, 6, 7, 99], 5),
    ]
    with caplog.at_level(logging.WARNING):
        assert stage.count_cut_ends(sequences, "responses") == 1
    assert "1 of 2 responses lost the end of their response" in caplog.text
    assert "policy.dpo.max_length 5" in caplog.text
