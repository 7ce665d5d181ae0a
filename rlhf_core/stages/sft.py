"""`rlhf stage sft`: supervised fine-tuning of the base model on chat demonstrations.

Inputs: the validated `sft` set and the base model (artifacts/base). The loss is the
completion-only next-token loss (prompt tokens masked, EOS kept), token-averaged over each
optimizer step (`training.objectives.sft`). Output: the SFT model at artifacts/sft (causal LM +
tokenizer, safetensors), which is the policy's start and the reference for DPO and PPO; plus
artifacts/metrics/sft.json, per-step curves in artifacts/plots/sft_curves.json (DVC plots)
and sft_curves.png, and an MLflow run with params, curves, data sets, samples and the model.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_core.config.stages import SFTSettings
from rlhf_core.files import writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import (
    run_training_stage,
    split_for_training,
    training_label,
)
from rlhf_core.training.objectives.sft import SFTObjective, tokenize_sft_rows

log = logging.getLogger(__name__)

STAGE = "sft"


def _samples(model: Any, tokenizer: Any, prompts: list, settings: SFTSettings, seed: int) -> list:
    from rlhf_core.generation import SamplingSettings, generate

    rollout = generate(
        model,
        tokenizer,
        prompts,
        SamplingSettings(max_new_tokens=settings.sample_max_new_tokens),
        seed,
    )
    return [
        {"prompt": prompt[-1]["content"] if prompt else "", "response": text, "ended": ended}
        for prompt, text, ended in zip(prompts, rollout.texts, rollout.ended, strict=True)
    ]


def run_sft(
    settings: SFTSettings,
    context: StageContext,
) -> dict:
    """Fine-tune the base model on the SFT set; write the model, metrics, curves and samples.

    Resumes an interrupted run (`training_stage`); returns the metrics of sft.json.
    """
    from rlhf_core.models.loading import load_causal_lm, save_model

    paths = ProjectPaths(context.root)
    train_frame, eval_frame, datasets = split_for_training(paths, "sft", context.data)
    if len(train_frame) == 0:
        raise ValueError("the sft set has no training examples; add data or lower eval_fraction")
    with run_training_stage(
        STAGE,
        settings,
        context,
        inputs={"sft": paths.validated_set("sft"), "base_model": paths.base_model_dir},
        label=training_label(settings.train),
        datasets=datasets,
    ) as stage:
        model, tokenizer = load_causal_lm(str(paths.base_model_dir))
        stage.check_outputs(model, paths.sft_model_dir)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and settings.max_length > limit:
            raise ValueError(
                f"sft.max_length {settings.max_length} exceeds the model's "
                f"max_position_embeddings {limit}; lower it."
            )

        def tokenized(rows):
            return tokenize_sft_rows(
                tokenizer, list(rows["prompt"]), list(rows["completion"]), settings.max_length
            )

        train_rows, eval_rows = tokenized(train_frame), tokenized(eval_frame)
        cut_ends = stage.count_cut_ends(train_rows + eval_rows, "examples")
        objective = SFTObjective(
            train_rows,
            eval_rows,
            tokenizer.pad_token_id,
            packing=settings.packing,
            max_length=settings.max_length,
            eval_batch_size=settings.eval_batch_size,
        )
        result = stage.train(
            model,
            objective,
            description="sft",
        )
        out_dir = paths.sft_model_dir
        with writing("the SFT model", out_dir):
            save_model(model, tokenizer, out_dir)
        samples = []
        if settings.num_samples and len(eval_frame):
            prompts = list(eval_frame["prompt"].iloc[: settings.num_samples])
            samples = _samples(model, tokenizer, prompts, settings, context.seed)
            stage.run.log_dict(samples, "samples.json")
        last = result.history[-1] if result.history else {}
        metrics = {
            "train_examples": len(train_frame),
            "eval_examples": len(eval_frame),
            "train_rows": len(objective.lengths),
            "truncated_ends": cut_ends,
            **result.summary(),
            "train_loss": last.get("loss"),
            "train_token_accuracy": last.get("token_accuracy"),
            **{k: v for k, v in result.final_eval.items() if k != "step"},
            "sample_ended_fraction": (
                sum(s["ended"] for s in samples) / len(samples) if samples else None
            ),
        }
        return stage.finish(
            result,
            metrics,
            out_dir,
            shown=("loss", "eval/loss", "eval/token_accuracy"),
            title="Supervised fine-tuning",
        )
