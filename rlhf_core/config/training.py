"""Settings of the training loops and of sampling: the `train:` sections of params.yaml
(`sft.train`, `reward.train`, `policy.dpo.train`, `policy.ppo.train`) and `evaluate.sampling`.

Importable without torch, so reading params (the CLI, the Prefect flows) never imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_core.algorithms.options import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS

SCHEDULES = ("cosine", "linear", "constant")


# Our names -> accelerate's. "fp32" rather than accelerate's "no": YAML 1.1 readers (PyYAML)
# turn an unquoted `no` into False, and DVC's params writer leaves it unquoted.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def require_batch_size(batch_size: int) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer but is {batch_size!r}.")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_finite_or_none(key: str, value: object) -> None:
    """Raise one clear error unless `value` is None or a finite number."""
    if value is not None and not (is_number(value) and math.isfinite(value)):
        raise ValueError(f"{key} must be a finite number or null, got {value!r}.")


def require_minimums(section: str, settings: object, minimums: dict[str, int]) -> None:
    """Raise one clear error for the first field of `settings` that is not an integer at least
    its minimum: "sft.max_length must be an integer >= 2, got 1"."""
    for name, minimum in minimums.items():
        value = getattr(settings, name)
        if not is_int(value) or value < minimum:
            raise ValueError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser, schedule and cadence knobs every `train:` section has.

    Attributes:
        learning_rate: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices (not on norms and biases).
        adam_beta1, adam_beta2: AdamW's moment decay rates.
        warmup_steps: linear warmup length in optimizer steps.
        schedule: decay after warmup: cosine | linear | constant.
        min_lr_ratio: the decay's floor as a fraction of the peak.
        max_grad_norm: global gradient-norm clip (0 disables).
        eval_every: evaluate every N steps (0 = only at the end).
        checkpoint_every: checkpoint every N steps (0 = never).
        keep_checkpoints: how many checkpoints to keep.
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer but is {value!r}")
        if not is_int(self.keep_checkpoints) or self.keep_checkpoints < 1:
            raise ValueError(
                f"keep_checkpoints must be a positive integer but is {self.keep_checkpoints!r}"
            )
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative but is {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1] but is {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainSettings(OptimizerSettings):
    """The `train:` section of the SFT, reward and DPO stages: `OptimizerSettings` plus
    the data passes and batching of `training.loop.train`.

    Attributes:
        epochs: passes over the training examples (fractional allowed).
        max_steps: optimizer steps; overrides epochs when set.
        batch_size: examples per optimizer step.
        micro_batch_size: examples per forward pass (gradient accumulation); None = batch_size.
        max_tokens_per_micro_batch: dynamic batching cap on examples × padded length.
        group_by_length: batch similar lengths together (less padding).
        mixed_precision: auto (default: `compute.precision`) | fp32 | bf16 | fp16 (accelerate
            autocast; fp32 on CPUs without fast bf16).
        disable_dropout: turn the model's dropout off before training (True, as TRL's DPO and
            reward trainers); a pretrained model's dropout adds noise to every comparison.
        seed: seeds initial RNG state and the data order (each stage sets the global seed).
    """

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None
    group_by_length: bool = True
    mixed_precision: str = "auto"
    disable_dropout: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixed_precision != "auto" and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be auto or one of {', '.join(MIXED_PRECISION)}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ValueError("batch_size and micro_batch_size must be at least 1")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("set epochs > 0 or max_steps")


@dataclass(frozen=True)
class SamplingSettings:
    """How `generate` samples.

    Attributes:
        max_new_tokens: most tokens per response (default 48); a response that reaches it
            without an EOS is marked `ended=False`.
        temperature: softmax temperature T > 0 for sampling (default 1.0). PPO's log-probs are
            computed at T = 1, so other values sample from a different policy than the one
            trained (the same holds for `top_k` and `top_p`).
        top_k: keep only the k most likely tokens; 0 (default) keeps all.
        top_p: nucleus sampling, keep the smallest set of tokens with mass ≥ top_p; 1.0
            (default) keeps all.
        batch_size: prompts per `model.generate` call (default 64).
        do_sample: sample (default True); False decodes greedily and ignores temperature,
            top_k and top_p.
    """

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive integer but is {self.max_new_tokens!r}."
            )
        if not is_number(self.temperature) or not 0.0 < self.temperature < float("inf"):
            raise ValueError(
                f"temperature must be a positive finite number but is {self.temperature!r}; "
                "use do_sample=False for greedy decoding."
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(
                f"top_k must be a non-negative integer (0 keeps all tokens) but is {self.top_k!r}."
            )
        if not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] but is {self.top_p!r}.")
        require_batch_size(self.batch_size)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false but is {self.do_sample!r}.")


@dataclass(frozen=True)
class PPOTrainSettings(OptimizerSettings):
    """The `policy.ppo.train` section: `OptimizerSettings` plus every knob of the PPO loop,
    with defaults sized for the embedded demo.

    Rollouts:
        iterations: rollout-then-update rounds (default 50).
        rollout_batch_size: responses sampled per iteration (64). With a group estimator
            this is `rollout_batch_size / group_size` prompts, each sampled `group_size` times.
        max_new_tokens: most tokens per response (48); a response that reaches it without an
            EOS counts as not ended.
        temperature: sampling temperature (1.0). Log-probs, entropy and KL are computed from
            logits divided by the same temperature, so PPO trains the policy it samples from.
        missing_eos_penalty: subtracted from the score of a response that never emitted EOS
            (1.0; 0 disables). Subtracted, not substituted for the score, so the reward model
            still ranks unfinished responses among themselves (`penalise_unfinished`).
        unfinished_score: when set, the score of every response that never emitted EOS, in
            place of the reward model's (None: the penalty above applies).

    Rewards and KL:
        init_kl_coef: β at the start (0.2); the per-token reward is −β·KL_t plus the score at
            the last response token. On the demo, β = 0.05 let the policy drift to 6+ nats and
            exploit the reward model (gold win rate vs SFT ≈ 0.5); 0.2 holds it near 3 nats.
        adaptive_kl: steer β towards `target_kl` (Ziegler et al. 2019) (True); False keeps
            β = init_kl_coef.
        target_kl: target per-sequence KL to the reference, in nats (3.0).
        kl_horizon: horizon of the adaptive controller in samples (500): β moves by at most
            20% · rollout_batch_size / kl_horizon per iteration (2.6% with the defaults; the
            10000 of Ziegler et al. would barely move β in a run of a few thousand samples).
        kl_estimator: per-token KL estimator in the reward: k1 | k2 | k3 | abs (k1). The logged
            `kl/mean` is always k1, Σ_t (log π − log π_ref), the quantity the controller steers.

    Advantages:
        advantage_estimator: gae | grpo | rloo (gae). grpo and rloo need no value head.
        group_size: samples per prompt for grpo/rloo (4); ignored by gae.
        kl_in_reward: grpo/rloo only: subtract β·Σ_t KL_t from each response's score before the
            group baseline (True); False optimises the score alone (KL only logged).
        gamma, lam: GAE discount and λ (1.0, 0.95).
        whiten_advantages: gae only: normalise advantages to zero mean, unit variance over the
            batch's response tokens (True). Group estimators are normalised within each group
            (grpo) or not at all (rloo), as their papers define them.

    Losses:
        ppo_epochs: passes over each rollout batch (2).
        minibatch_size: responses per optimizer step (16); must divide rollout_batch_size.
        micro_batch_size: responses per forward pass (None = minibatch_size); must divide
            minibatch_size. Accumulation is exact: the losses are token means over the minibatch.
        clip_range: PPO ratio clip ε (0.2).
        clip_range_value: value clip around the rollout's values (0.2); inf disables it.
        vf_coef: weight of the value loss (0.1); the value head shares the policy's trunk.
        entropy_coef: weight of the entropy bonus (0.0).

    Optimisation and cadence (`OptimizerSettings`, with PPO's own defaults): learning_rate
    1e-4, schedule constant, warmup_steps 10 optimizer steps; eval_every 10 iterations (0 = only
    before the first and after the last), checkpoint_every 10 iterations.
    """

    iterations: int = 50
    rollout_batch_size: int = 64
    max_new_tokens: int = 48
    temperature: float = 1.0
    missing_eos_penalty: float = 1.0
    unfinished_score: float | None = None
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    target_kl: float = 3.0
    kl_horizon: float = 500.0
    kl_estimator: str = "k1"
    advantage_estimator: str = "gae"
    group_size: int = 4
    kl_in_reward: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ppo_epochs: int = 2
    minibatch_size: int = 16
    micro_batch_size: int | None = None
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    learning_rate: float = 1e-4
    schedule: str = "constant"
    eval_every: int = 10
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = (
            "iterations",
            "rollout_batch_size",
            "max_new_tokens",
            "ppo_epochs",
            "minibatch_size",
        )
        require_minimums("policy.ppo.train", self, dict.fromkeys(positive, 1))
        micro = self.micro_batch_size
        if micro is not None and (not is_int(micro) or micro < 1):
            raise ValueError(
                f"ppo micro_batch_size must be a positive integer or null, not {micro!r}."
            )
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"ppo minibatch_size {self.minibatch_size} must divide rollout_batch_size "
                f"{self.rollout_batch_size}."
            )
        if self.minibatch_size % self.micro_batch_size_or_minibatch:
            raise ValueError(
                f"ppo micro_batch_size {micro} must divide minibatch_size {self.minibatch_size}."
            )
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"ppo advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, "
                f"not {self.advantage_estimator!r}."
            )
        if self.uses_groups:
            if not is_int(self.group_size) or self.group_size < 2:
                raise ValueError(f"ppo group_size must be at least 2 but is {self.group_size!r}.")
            if self.rollout_batch_size % self.group_size:
                raise ValueError(
                    f"ppo group_size {self.group_size} must divide rollout_batch_size "
                    f"{self.rollout_batch_size}."
                )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"ppo kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                f"not {self.kl_estimator!r}."
            )
        if not 0.0 < self.temperature < math.inf:
            raise ValueError(f"ppo temperature must be positive but is {self.temperature}.")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ppo gamma and lam must lie in [0, 1], not {self.gamma}, {self.lam}.")
        for name in ("clip_range", "clip_range_value", "target_kl", "kl_horizon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo {name} must be positive but is {getattr(self, name)}.")
        require_finite_or_none("policy.ppo.train.unfinished_score", self.unfinished_score)
        for name in ("missing_eos_penalty", "init_kl_coef", "vf_coef", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ppo {name} must be non-negative but is {getattr(self, name)}.")

    @property
    def uses_groups(self) -> bool:
        """Whether advantages come from a group baseline (grpo, rloo) instead of a critic."""
        return self.advantage_estimator != "gae"

    @property
    def micro_batch_size_or_minibatch(self) -> int:
        """Responses per forward pass."""
        return self.micro_batch_size or self.minibatch_size

    @property
    def prompts_per_iteration(self) -> int:
        """Distinct prompts per iteration (rollout_batch_size / group_size for grpo, rloo)."""
        return self.rollout_batch_size // (self.group_size if self.uses_groups else 1)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the scheduler's length)."""
        return self.iterations * self.ppo_epochs * (self.rollout_batch_size // self.minibatch_size)
