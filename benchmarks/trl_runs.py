"""TRL's trainers on the shared workload, with TRL's best CPU settings (not its defaults).

fp32 (`bf16=False`: this CPU has no fast bf16), `gradient_checkpointing=False`, length-grouped
sampling (`train_sampling_strategy="group_by_length"`), no evaluation or saving, the same
constant learning rate, AdamW betas, weight decay and gradient clipping as ours. DPO gets
an explicit reference model and `precompute_ref_log_probs=True`. The data are TRL's standard
prompt/completion (and prompt/chosen/rejected) format with the prompt already rendered by the
same chat template, so both sides see the same tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks.meter import StepMeter
from benchmarks.settings import BenchSettings
from benchmarks.workload import base_dir, load_rows


def _common_args(settings: BenchSettings, batch_size: int, out_dir: str) -> dict[str, Any]:
    return {
        "output_dir": out_dir,
        "max_steps": settings.total_steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "train_sampling_strategy": "group_by_length",
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": settings.seed,
        "max_length": settings.max_length,
    }


def _meter_callback(meter: StepMeter):
    from transformers import TrainerCallback

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end_step()

    return MeterCallback()


def _losses(trainer) -> dict[str, float]:
    """The last step's training loss and the mean over steps (logged every step)."""
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {"final_loss": losses[-1], "mean_loss": sum(losses) / len(losses)}


def _train(trainer, model, settings: BenchSettings) -> StepMeter:
    meter = StepMeter(settings.warmup_steps)
    trainer.add_callback(_meter_callback(meter))
    meter.attach(model)
    try:
        trainer.train()
    finally:
        meter.detach()
    return meter


def _tokenizer(workspace: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir(workspace)))


def run_sft(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """`trl.SFTTrainer`, prompt-completion data (completion-only loss, TRL's default)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = load_rows(workspace, "sft")
    dataset = Dataset.from_list(
        [{"prompt": r["prompt_text"], "completion": r["completion"]} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(str(base_dir(workspace)))
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(**_common_args(settings, settings.sft_batch_size, out_dir))
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(workspace)
        )
        meter = _train(trainer, model, settings)
    return {"meter": meter, **_losses(trainer), "model": model}


def _pair_dataset(workspace: Path, tokenizer):
    """prompt/chosen/rejected rows, plus a `length` column (the pair's longer sequence) so the
    length-grouped sampler, which cannot infer lengths from TRL's pair columns, can group."""
    from datasets import Dataset

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    rows = load_rows(workspace, "preference")
    return Dataset.from_list(
        [
            {
                "prompt": r["prompt_text"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "length": max(
                    tokens(r["prompt_text"] + r["chosen"]), tokens(r["prompt_text"] + r["rejected"])
                ),
            }
            for r in rows
        ]
    )


def run_reward(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """`trl.RewardTrainer` on a sequence-classification head over the same trunk."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_core.models.heads import init_scalar_head

    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir(workspace)), num_labels=1
    )
    tokenizer = _tokenizer(workspace)
    model.config.pad_token_id = tokenizer.pad_token_id
    # The same initial score head as ours (N(0, 1/(d+1)), seeded), so the two runs start from
    # identical weights and their losses can be compared.
    head = init_scalar_head(model.config.hidden_size, seed=settings.seed)
    with torch.no_grad():
        model.score.weight.copy_(head.weight)
    with tempfile.TemporaryDirectory() as out_dir:
        args = RewardConfig(
            **_common_args(settings, settings.pair_batch_size, out_dir),
            remove_unused_columns=False,  # keep `length` for the length-grouped sampler
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=_pair_dataset(workspace, tokenizer),
            processing_class=tokenizer,
        )
        meter = _train(trainer, model, settings)
    return {"meter": meter, **_losses(trainer), "model": model}


def run_dpo(workspace: Path, settings: BenchSettings, lora: bool = False) -> dict[str, Any]:
    """`trl.DPOTrainer`, sigmoid loss, β = 0.1, explicit reference, precomputed ref log-probs;
    with `lora`, a peft LoRA config instead of a reference model (TRL then uses the base with
    the adapters off as the reference, as ours does)."""
    import time

    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir(workspace)))
    reference = None if lora else AutoModelForCausalLM.from_pretrained(str(base_dir(workspace)))
    peft_config = None
    if lora:  # the very LoraConfig our DPO stage builds
        from benchmarks.ours import lora_settings
        from rlhf_core.stages.dpo import lora_config

        peft_config = lora_config(lora_settings(settings))
    tokenizer = _tokenizer(workspace)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **_common_args(settings, settings.pair_batch_size, out_dir),
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
            remove_unused_columns=False,  # keep `length` for the length-grouped sampler
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=_pair_dataset(workspace, tokenizer),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        model = trainer.model  # the peft-wrapped model with LoRA
        del reference
        started = time.perf_counter()
        meter = _train(trainer, model, settings)
        run_s = time.perf_counter() - started
    # train() time outside the optimizer steps: the reference pass TRL runs first, and setup.
    outside_steps_s = max(0.0, run_s - sum(meter.step_seconds))
    return {
        "meter": meter,
        **_losses(trainer),
        "model": model,
        "reference_and_setup_s": outside_steps_s,
    }


def run_dpo_lora(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """`run_dpo` with a peft LoRA config (the same rank, alpha and modules as ours)."""
    return run_dpo(workspace, settings, lora=True)
