"""The prepare and validate stages on the tiny project."""

import json

from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import load_validated, train_eval_split


def test_prepare_and_validate_write_every_fixed_output(tiny_project, tiny_params):
    paths = ProjectPaths(tiny_project)
    for name in ("sft", "preference", "ranked", "prompts", "eval_prompts"):
        report = json.loads((paths.validated_set(name) / "report.json").read_text())
        assert report["total"] == report["valid"] + report["quarantined"]
        assert report["passed"], name
    summary = json.loads(paths.metrics_file("validate").read_text())
    assert summary["passed"] and set(summary["sets"]) >= {"sft", "preference", "eval_prompts"}
    meta = json.loads((paths.raw_dir / "demo_meta.json").read_text())
    assert 0.5 < meta["annotator_agreement_expected"] < 1.0
    model, tokenizer = load_causal_lm(str(paths.base_model_dir))
    assert model.config.hidden_size == 32 and tokenizer.chat_template
    RewardModel.from_pretrained(paths.reward_model_dir)


def test_validated_sets_split_stably(tiny_project, tiny_params):
    frame = load_validated(ProjectPaths(tiny_project), "preference")
    assert len(frame) == tiny_params.demo.n_preference_prompts
    assert isinstance(frame.loc[0, "prompt"], list)
    train, held_out = train_eval_split(frame, 0.2)
    assert len(train) + len(held_out) == len(frame) and len(held_out) > 0
    again_train, _ = train_eval_split(frame.sample(frac=1.0, random_state=1), 0.2)
    assert set(map(str, train["prompt"])) == set(map(str, again_train["prompt"]))
