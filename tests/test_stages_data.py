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


def test_prepare_and_validate_are_mlflow_runs_and_validate_outputs_are_reproducible(
    tiny_project, tiny_params
):
    from mlflow import MlflowClient

    from rlhf_core.stages.validate import run_validate
    from rlhf_core.tracking.experiment import tracking_uri
    from rlhf_core.tracking.lineage import path_md5, read_producer_run_id

    paths = ProjectPaths(tiny_project)
    client = MlflowClient(tracking_uri(tiny_project))
    validate_run = client.get_run(read_producer_run_id(paths.validated_dir))
    assert validate_run.data.tags["stage"] == "validate"
    metrics = validate_run.data.metrics
    assert (
        metrics["preference.total"]
        == metrics["preference.valid"] + metrics["preference.quarantined"]
    )
    docs = {a.path for a in client.list_artifacts(validate_run.info.run_id, "data_docs")}
    assert "data_docs/preference" in docs
    # The Data Docs live outside the DVC output, which holds no timings or timestamps.
    assert (paths.data_docs_dir("preference") / "index.html").is_file()
    assert not (paths.validated_set("preference") / "data_docs").exists()
    prepare_run = client.get_run(read_producer_run_id(paths.base_model_dir))
    assert prepare_run.data.tags["stage"] == "prepare"
    assert prepare_run.data.metrics["base_model.parameters"] > 0

    before = path_md5(paths.validated_dir)
    run_validate(tiny_params, tiny_project)
    assert path_md5(paths.validated_dir) == before
    assert read_producer_run_id(paths.validated_dir) != validate_run.info.run_id


def test_prepare_does_not_read_the_preference_store(tiny_project, tiny_params, tmp_path):
    """Rows arriving in the store rerun validate and what follows, never prepare: the demo
    tokenizer and base model stay those of the raw data."""
    from rlhf_core.data.store import ingest_files
    from rlhf_core.stages.prepare import run_prepare
    from rlhf_core.tracking.lineage import path_md5

    paths = ProjectPaths(tiny_project)
    base_before = path_md5(paths.base_model_dir)
    new_rows = tmp_path / "new.jsonl"
    new_rows.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": f"Review the film Zebra{i} for me.",
                    "chosen": f"Zebra{i} is a warm, funny and moving film.",
                    "rejected": f"Zebra{i} quux quux quux zzz.",
                }
            )
            for i in range(20)
        )
        + "\n"
    )
    [result] = ingest_files([new_rows], paths.preference_store)
    assert result.added == 20
    run_prepare(tiny_params, tiny_project)
    assert path_md5(paths.base_model_dir) == base_before
