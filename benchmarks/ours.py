"""Our trainers on the shared workload: the same code paths the pipeline stages run.

Each function loads the shared initial model, trains for `settings.total_steps` optimizer
steps with a `StepMeter` attached, and returns the meter, the final training loss, the loop's
own per-step token counts (a check on the meter) and the model whose FLOPs are counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.meter import StepMeter
from benchmarks.settings import BenchSettings
from benchmarks.workload import base_dir, load_rows


def _train_settings(settings: BenchSettings, batch_size: int):
    from rlhf_core.config.training import TrainSettings

    return TrainSettings(
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        warmup_steps=0,
        schedule="constant",
        max_grad_norm=1.0,
        max_steps=settings.total_steps,
        batch_size=batch_size,
        group_by_length=True,
        eval_every=0,
        checkpoint_every=0,
        mixed_precision="fp32",
        seed=settings.seed,
    )


def _train(model, task, settings: BenchSettings, batch_size: int) -> dict[str, Any]:
    """Train with a meter attached; the loop's own per-step token counts come back too."""
    from rlhf_core.training.loop import train

    meter = StepMeter(settings.warmup_steps).attach(model)
    try:
        result = train(
            model,
            task,
            _train_settings(settings, batch_size),
            on_log=lambda step, metrics: meter.end_step(),
            show_progress=False,
        )
    finally:
        meter.detach()
    return {
        "meter": meter,
        "final_loss": float(result.history[-1]["loss"]),
        "mean_loss": sum(float(entry["loss"]) for entry in result.history) / len(result.history),
        "loop_step_tokens": [int(entry["tokens"]) for entry in result.history],
    }


def run_sft(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """Completion-only SFT (`SFTObjective`, unpacked, length-grouped batches)."""
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.training.objectives.sft import SFTObjective, tokenize_sft_rows

    model, tokenizer = load_causal_lm(str(base_dir(workspace)))
    rows = load_rows(workspace, "sft")
    examples = tokenize_sft_rows(
        tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], settings.max_length
    )
    task = SFTObjective(examples, [], tokenizer.pad_token_id)
    return {**_train(model, task, settings, settings.sft_batch_size), "model": model}


def run_reward(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """Bradley–Terry reward model (`RewardObjective`: chosen and rejected in one forward)."""
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.training.objectives.reward import RewardObjective, tokenize_group

    causal_lm, tokenizer = load_causal_lm(str(base_dir(workspace)))
    model = RewardModel.from_causal_lm(causal_lm, seed=settings.seed)
    del causal_lm
    rows = load_rows(workspace, "preference")
    groups = [
        tokenize_group(tokenizer, r["prompt"], [r["chosen"], r["rejected"]], settings.max_length)
        for r in rows
    ]
    task = RewardObjective(groups, [], tokenizer.pad_token_id)
    return {**_train(model, task, settings, settings.pair_batch_size), "model": model}


def run_dpo(workspace: Path, settings: BenchSettings, lora: bool = False) -> dict[str, Any]:
    """Sigmoid DPO, β = 0.1: reference log-probs computed once, pairs in one forward; with
    `lora`, only LoRA adapters train (as the DPO stage with `lora.enabled`)."""
    import time

    from rlhf_core.config.stages import DPOSettings
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.training.objectives.preference import (
        PreferenceObjective,
        reference_logps,
        tokenize_pairs,
    )

    model, tokenizer = load_causal_lm(str(base_dir(workspace)))
    reference, _ = load_causal_lm(str(base_dir(workspace)))
    rows = load_rows(workspace, "preference")
    pairs = tokenize_pairs(
        tokenizer,
        [r["prompt"] for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        settings.max_length,
    )
    started = time.perf_counter()
    cached = reference_logps(reference, pairs, tokenizer.pad_token_id)
    reference_s = time.perf_counter() - started
    del reference
    if lora:
        from rlhf_core.stages.dpo import apply_lora

        model = apply_lora(model, lora_settings(settings))
    pair_loss = DPOSettings(loss_type="sigmoid", beta=0.1, rpo_alpha=0.0).pair_loss()
    task = PreferenceObjective(pair_loss, pairs, tokenizer.pad_token_id, train_reference=cached)
    trained = _train(model, task, settings, settings.pair_batch_size)
    return {**trained, "model": model, "reference_s": reference_s}


def run_dpo_lora(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """`run_dpo` training LoRA adapters only."""
    return run_dpo(workspace, settings, lora=True)


def lora_settings(settings: BenchSettings):
    """The LoRA both sides use: rank r, alpha 2·r, no dropout, attention projections."""
    from rlhf_core.config.stages import LoraSettings

    return LoraSettings(
        enabled=True,
        r=settings.lora_r,
        alpha=2.0 * settings.lora_r,
        dropout=0.0,
        target_modules=LORA_TARGETS,
    )


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
