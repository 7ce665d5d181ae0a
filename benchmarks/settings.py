"""What a benchmark run measures: model size, batch shapes, step counts and threads.

Both implementations of a stage get the same `BenchSettings`: the same model weights, data,
batch size, sequence length, optimizer steps, learning rate, threads and dtype (fp32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STAGES = ("sft", "reward", "dpo", "dpo_lora", "ppo")
# TRL 1.16 has no PPO trainer any more (its PPOTrainer was removed in the 1.x line; the
# online RL trainers left are GRPO and RLOO, which need no reward model).
TRL_STAGES = ("sft", "reward", "dpo", "dpo_lora")


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one benchmark run.

    base_model: a pretrained model to measure (a .gguf file or a safetensors folder; `make
        bench-real` passes SmolLM2-135M-Instruct) with its own tokenizer; "" builds the
        from-scratch model `model_config` with a BPE trained on the demo texts.
    model_config: a named shape from `rlhf_core.models.tiny.TINY_CONFIGS`.
    vocab_size: BPE vocabulary trained on the demo texts (the small demo corpus stops short
        of it: about 1k tokens).
    model_vocab_size: rows of the model's embedding and LM head, padded past the tokenizer
        as models with large vocabularies have them, so the LM head and the log-softmax cost
        what they cost in practice (0 = the tokenizer's size).
    max_length: longest sequence (prompt + response + EOS); the data stays below it, so
        neither implementation truncates and both see the same tokens.
    min_length: shortest sequence the generator aims for (lengths spread uniformly between).
    sft_batch_size: SFT examples per optimizer step.
    pair_batch_size: preference pairs per optimizer step (reward model and DPO).
    warmup_steps: optimizer steps run but not timed (allocator and kernel warm-up).
    timed_steps: optimizer steps timed after the warm-up.
    learning_rate: constant AdamW learning rate (no schedule warm-up), both implementations.
    threads: torch intra-op threads (0 = every core).
    lora_r: LoRA rank of the dpo_lora stage (alpha 2·r, on q, k, v and o projections).
    ppo_iterations, ppo_rollout_batch_size, ppo_max_new_tokens, ppo_minibatch_size: PPO run.
    matmul_size: side of the square fp32 matmul that measures the machine's peak.
    seed: data, weights and data order.
    """

    base_model: str = ""
    model_config: str = "bench"
    vocab_size: int = 4096
    model_vocab_size: int = 8192
    max_length: int = 256
    min_length: int = 96
    sft_batch_size: int = 8
    pair_batch_size: int = 4
    warmup_steps: int = 1
    timed_steps: int = 4
    learning_rate: float = 1e-4
    threads: int = 0
    lora_r: int = 16
    ppo_iterations: int = 2
    ppo_rollout_batch_size: int = 16
    ppo_max_new_tokens: int = 64
    ppo_minibatch_size: int = 8
    matmul_size: int = 2048
    seed: int = 0

    @property
    def total_steps(self) -> int:
        """Optimizer steps each training run takes (warm-up + timed)."""
        return self.warmup_steps + self.timed_steps

    def examples_needed(self, batch_size: int) -> int:
        """Training examples for `total_steps` steps of `batch_size` without reuse."""
        return batch_size * self.total_steps

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return dataclasses.asdict(self)


# A few seconds per stage: the harness's own tests run it end to end on this.
QUICK = BenchSettings(
    model_config="nano",
    vocab_size=400,
    model_vocab_size=0,
    max_length=128,  # a 400-token BPE spends up to ~50 tokens on a demo prompt
    min_length=64,
    sft_batch_size=4,
    pair_batch_size=2,
    warmup_steps=1,
    timed_steps=2,
    ppo_iterations=1,
    ppo_rollout_batch_size=4,
    ppo_max_new_tokens=8,
    ppo_minibatch_size=2,
    matmul_size=256,
)


def real_model_settings(base_model: str) -> BenchSettings:
    """A pretrained model at the sizes of the default run, fewer timed steps (a 135M model
    trains at about 100 tokens/s on 2 CPU cores) and a fine-tuning learning rate."""
    return BenchSettings(
        base_model=base_model,
        timed_steps=2,
        learning_rate=1e-5,
        ppo_iterations=1,
        ppo_max_new_tokens=48,
    )


# Overrides of params.yaml for a pipeline of seconds per stage (the quick harness check and the
# end-to-end tests): a nano model and a few dozen rows, thresholds any trained model passes.
_TINY_TRAIN = {
    "epochs": 1,
    "batch_size": 16,
    "warmup_steps": 1,
    "eval_every": 0,
    "checkpoint_every": 0,
}
QUICK_PIPELINE_PARAMS = {
    "seed": 0,
    "model": {"base": "demo", "tiny_config": "nano", "tokenizer_vocab_size": 400},
    "data": {"eval_fraction": 0.2},
    "demo": {
        "n_sft": 64,
        "n_preference_prompts": 48,
        "n_ranked": 0,
        "n_ppo_prompts": 16,
        "n_eval_prompts": 8,
        "n_reward_eval_pairs": 40,
    },
    "sft": {"train": _TINY_TRAIN, "num_samples": 2, "sample_max_new_tokens": 8},
    "reward": {"train": _TINY_TRAIN},
    "policy": {
        "algorithms": ["dpo", "ppo"],
        "dpo": {"train": _TINY_TRAIN},
        "ppo": {
            "train": {
                "iterations": 2,
                "rollout_batch_size": 8,
                "max_new_tokens": 8,
                "minibatch_size": 4,
                "warmup_steps": 0,
                "eval_every": 0,
                "checkpoint_every": 0,
            },
            "max_eval_prompts": 4,
        },
    },
    "evaluate": {
        "sampling": {"max_new_tokens": 8, "batch_size": 16},
        "best_of_n": [2],
        "max_prompts": 4,
        "bootstrap": False,
    },
    "gate": {
        "min_policy_metric": 0.0,
        "max_kl": 1.0e6,
        "min_reward_accuracy": 0.0,
        "min_win_rate_vs_champion": 0.0,
        "min_ended_fraction": 0.0,  # 8-token samples of an untrained nano model rarely end
    },
}
