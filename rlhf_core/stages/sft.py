"""`rlhf stage sft`: supervised fine-tuning of the base model on chat demonstrations.

Inputs: the validated `sft` set and the base model (artifacts/base). The loss is the
completion-only next-token loss (prompt tokens masked, EOS kept), token-averaged over each
optimizer step (`training.objectives.sft`). Output: the SFT model at artifacts/sft (causal LM +
tokenizer, safetensors), which is the policy's start and the reference for DPO and PPO; plus
artifacts/metrics/sft.json, per-step curves in artifacts/plots/sft_curves.json (DVC plots)
and sft_curves.png, and an MLflow run with params, curves, data sets, samples and the model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.files import write_json
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import (
    eval_metric_name,
    load_validated,
    run_fingerprint,
    train_eval_split,
    training_curves,
    training_label,
    write_curve_plots,
)
from rlhf_core.stages.settings import SFTSettings
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import seed_everything, train
from rlhf_core.training.objectives.sft import SFTTask, tokenize_sft_rows

if TYPE_CHECKING:  # config imports this module for its settings class
    from rlhf_core.config import DataParams

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
    *,
    data: DataParams,
    seed: int,
    root: Path = Path("."),
    show_progress: bool = True,
) -> dict:
    """Fine-tune the base model on the SFT set; write the model, metrics, curves and samples.

    Resumes from the newest checkpoint of an interrupted run with the same settings and
    inputs. Returns the final metrics (also written to artifacts/metrics/sft.json).
    """
    from rlhf_core.models.loading import load_causal_lm, save_model
    from rlhf_core.tracking.runs import stage_run

    paths = ProjectPaths(root)
    frame = load_validated(paths, "sft")
    train_frame, eval_frame = train_eval_split(frame, data.eval_fraction, data.split_salt)
    if len(train_frame) == 0:
        raise ValueError("the sft set has no training examples; add data or lower eval_fraction")
    if not paths.base_model_dir.is_dir():
        raise FileNotFoundError(f"{paths.base_model_dir}: not found; run `rlhf stage prepare`")
    inputs = {"sft": paths.validated_set("sft"), "base_model": paths.base_model_dir}
    train_settings = dataclasses.replace(settings.train, seed=seed)
    params = {
        STAGE: dataclasses.asdict(settings),
        "data.eval_fraction": data.eval_fraction,
        "data.split_salt": data.split_salt,
        "seed": seed,
    }
    with stage_run(
        STAGE,
        project_root=root,
        params=params,
        inputs=inputs,
        label=training_label(settings.train),
    ) as run:
        source = paths.validated_set("sft") / "valid.parquet"
        run.log_dataset(train_frame, "sft_train", context="training", source=source)
        if len(eval_frame):
            run.log_dataset(eval_frame, "sft_eval", context="evaluation", source=source)
        seed_everything(seed)
        model, tokenizer = load_causal_lm(str(paths.base_model_dir))
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

        task = SFTTask(
            tokenized(train_frame),
            tokenized(eval_frame),
            tokenizer.pad_token_id,
            packing=settings.packing,
            max_length=settings.max_length,
            eval_batch_size=settings.eval_batch_size,
        )
        checkpoints = CheckpointManager(
            paths.checkpoints_dir(STAGE),
            keep=train_settings.keep_checkpoints,
            fingerprint=run_fingerprint(settings, data, seed, inputs),
        )

        def on_log(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in metrics.items() if k != "tokens"}, step)

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics({eval_metric_name(k): v for k, v in metrics.items()}, step)

        result = train(
            model,
            task,
            train_settings,
            checkpoints=checkpoints,
            on_log=on_log,
            on_eval=on_eval,
            description="sft",
            show_progress=show_progress,
        )
        run.set_tags({"resumed_from": result.resumed_from})
        out_dir = paths.sft_model_dir
        save_model(model, tokenizer, out_dir)
        samples = []
        if settings.num_samples and len(eval_frame):
            prompts = list(eval_frame["prompt"].iloc[: settings.num_samples])
            samples = _samples(model, tokenizer, prompts, settings, seed)
            run.log_dict(samples, "samples.json")
        last = result.history[-1] if result.history else {}
        metrics = {
            "train_examples": len(train_frame),
            "eval_examples": len(eval_frame),
            "train_rows": len(task.lengths),
            "steps": result.global_step,
            "resumed_from": result.resumed_from,
            "train_seconds": round(result.train_seconds, 3),
            "mean_tokens_per_s": (
                result.tokens / result.train_seconds if result.train_seconds else 0.0
            ),
            "train_loss": last.get("loss"),
            "train_token_accuracy": last.get("token_accuracy"),
            **result.final_eval,
            "sample_ended_fraction": (
                sum(s["ended"] for s in samples) / len(samples) if samples else None
            ),
        }
        metrics.pop("step", None)
        write_json(paths.metrics_file(STAGE), metrics)
        run.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float)}, result.global_step
        )
        write_curve_plots(
            run,
            training_curves(result.history, result.eval_history),
            paths,
            STAGE,
            ("loss", "eval/loss", "eval/token_accuracy"),
            "Supervised fine-tuning",
        )
        run.log_artifact(paths.metrics_file(STAGE), "metrics")
        run.log_model_dir(out_dir, "model")
        run.record_output(out_dir)
    checkpoints.clear()
    return metrics
