"""The shared skeleton of the training stages: its warnings about real-model pitfalls."""

import logging
from pathlib import Path

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


def test_the_code_deps_of_a_stage_are_its_dvc_yaml_deps_that_are_not_data():
    import yaml

    from rlhf_core.stages.stage_code import code_dependencies

    repo = Path(__file__).resolve().parents[1]
    root = yaml.safe_load((repo / "dvc.yaml").read_text())
    sft = code_dependencies(root, "sft")
    assert "rlhf_core/stages/sft.py" in sft and "rlhf_core/training" in sft
    assert not any(dep.startswith(("data/", "artifacts/")) for dep in sft)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    dpo = code_dependencies(root, "dpo", params)  # foreach over policy.algorithms: ${item}
    assert "rlhf_core/stages/dpo.py" in dpo and "rlhf_core/stages/ppo.py" not in dpo
    assert code_dependencies(root, "no-such-stage", params) == []
    assert code_dependencies(root, "dpo") == []  # the items are in params, not given
    example = yaml.safe_load((repo / "examples/smollm2/dvc.yaml").read_text())
    assert "../../rlhf_core/stages/reward.py" in code_dependencies(example, "reward")
    assert all("${" not in dep for dep in code_dependencies(example, "prepare"))
