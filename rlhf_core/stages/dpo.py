"""`rlhf stage dpo`: align the SFT model on preference pairs with DPO (or IPO, SLiC, SimPO).

Inputs: the validated `preference` set and the SFT model (artifacts/sft), which is both the
policy's initialisation and the frozen reference. The reference log-probabilities of every
pair are computed once, with the SFT weights, before the first optimizer step; then the same
model object trains. Output: the aligned policy at artifacts/policy/dpo (a plain causal LM +
tokenizer; with LoRA the adapter is merged into the weights and also kept in `adapter/`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_core.config.stages import DPOSettings, LoraSettings
from rlhf_core.files import writing
from rlhf_core.models.loading import atomic_directory, load_causal_lm, save_model
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import (
    run_training_stage,
    split_for_training,
)
from rlhf_core.training.objectives.preference import (
    PreferenceObjective,
    TokenizedPair,
    reference_logps,
    tokenize_pairs,
)

log = logging.getLogger(__name__)

STAGE = "dpo"
LORA_INSTALL_HINT = "install peft (pip install 'rlhf-pipeline[lora]')"


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def lora_config(lora: LoraSettings) -> Any:
    """The peft `LoraConfig` of `lora` (a causal LM's adapters)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ValueError(f"LoRA needs peft: {LORA_INSTALL_HINT}.") from error
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model; only the adapters stay trainable."""
    config = lora_config(lora)
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(
            f"lora.target_modules {list(lora.target_modules)} do not fit this model: {error}"
        ) from error


def save_policy(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, lora: bool, base_dir: Path
) -> None:
    """Save a plain causal LM + tokenizer (safetensors), atomically.

    A LoRA model is saved twice: its adapter in `out_dir/adapter/`, and the weights with the
    adapter merged in, so that downstream stages load a plain model. The adapter names its
    base by absolute path (`base_dir`, the SFT model), so it loads from any working directory.
    """
    if not lora:
        with writing("the DPO policy", out_dir):
            save_model(model, tokenizer, out_dir)
        return
    with writing("the DPO policy and its adapter", out_dir), atomic_directory(out_dir) as staging:
        model.save_pretrained(staging / "adapter")
        adapter_config = staging / "adapter" / "adapter_config.json"
        config = json.loads(adapter_config.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(Path(base_dir).resolve())
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        merged = model.merge_and_unload()
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _pairs(tokenizer: Any, frame: Any, max_length: int) -> list[TokenizedPair]:
    return tokenize_pairs(
        tokenizer, list(frame["prompt"]), list(frame["chosen"]), list(frame["rejected"]), max_length
    )


def run_dpo(
    settings: DPOSettings,
    context: StageContext,
) -> dict:
    """Train the DPO policy from the SFT model; write the model, metrics and curves.

    Returns the final metrics (also written to artifacts/metrics/dpo.json).
    """
    paths = ProjectPaths(context.root)
    train_frame, eval_frame, datasets = split_for_training(paths, "preference", context.data)
    if len(train_frame) == 0:
        raise ValueError(
            "the preference set has no training pairs; add data or lower eval_fraction"
        )
    with run_training_stage(
        STAGE,
        settings,
        context,
        inputs={"preference": paths.validated_set("preference"), "sft_model": paths.sft_model_dir},
        label=f"{settings.loss_type} beta={settings.beta:g} lr={settings.train.learning_rate:g}",
        datasets=datasets,
    ) as stage:
        model, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        model = model.to(context.device)  # the reference pass below runs where training will
        train_pairs = _pairs(tokenizer, train_frame, settings.max_length)
        eval_pairs = _pairs(tokenizer, eval_frame, settings.max_length)
        cut_ends = stage.count_cut_ends(
            [
                response
                for pair in train_pairs + eval_pairs
                for response in (pair.chosen, pair.rejected)
            ],
            "responses",
        )
        train_reference = eval_reference = None
        reference_started = time.perf_counter()
        if settings.needs_reference:
            # The untrained model IS the reference: score every pair with it once, now.
            cached = reference_logps(
                model,
                train_pairs + eval_pairs,
                tokenizer.pad_token_id,
                settings.inference_batch_size,
                context.show_progress,
            )
            train_reference, eval_reference = cached[: len(train_pairs)], cached[len(train_pairs) :]
            log.info(
                "reference log-probs of %d pairs in %.1f s",
                len(cached),
                time.perf_counter() - reference_started,
            )
        reference_seconds = time.perf_counter() - reference_started
        if settings.lora.enabled:
            model = apply_lora(model, settings.lora)
        stage.check_outputs(model, paths.policy_dir(STAGE))  # LoRA: optimizer state of adapters
        objective = PreferenceObjective(
            settings.pair_loss(),
            train_pairs,
            tokenizer.pad_token_id,
            train_reference=train_reference,
            eval_pairs=eval_pairs,
            eval_reference=eval_reference,
            eval_batch_size=settings.inference_batch_size,
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = stage.train(
            model,
            objective,
            description=f"dpo ({settings.loss_type})",
        )
        out_dir = paths.policy_dir(STAGE)
        save_policy(
            model, tokenizer, out_dir, lora=settings.lora.enabled, base_dir=paths.sft_model_dir
        )
        metrics = {
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
            "truncated_ends": cut_ends,
            **result.summary(),
            "trainable_parameters": trainable,
            "reference_seconds": round(reference_seconds, 3),
            "train_loss": result.history[-1]["loss"] if result.history else None,
            **{f"eval/{k}": v for k, v in result.final_eval.items() if k != "step"},
        }
        return stage.finish(
            result,
            metrics,
            out_dir,
            shown=("loss", "eval/loss", "rewards/margins", "rewards/accuracies"),
            title=f"DPO ({settings.loss_type}, beta={settings.beta})",
        )
