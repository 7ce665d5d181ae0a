"""The settings of each stage: the `sft`, `policy.dpo`, `policy.ppo` and `evaluate` sections
of params.yaml (the `reward` section's are in `config.reward`). Importable without torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from rlhf_core.algorithms.options import (
    LENGTH_NORMALISED_LOSS_TYPES,
    LOSS_TYPES,
    REWARD_AGGREGATES,
)
from rlhf_core.config.training import (
    PPOTrainSettings,
    SamplingSettings,
    TrainSettings,
    is_int,
    is_number,
    require_finite_or_none,
    require_minimums,
)

if TYPE_CHECKING:
    from rlhf_core.training.objectives.preference import PairLossFunction

# Measured on the demo (0.9M-parameter Llama from scratch, 1805 training examples of ~48
# tokens, 2 CPU cores): eval loss falls until about epoch 7 and samples are fluent, well-formed
# reviews that end with EOS; 8 epochs are 456 steps, about 75 s of single-core compute.
SFT_DEMO_TRAIN = TrainSettings(
    learning_rate=5e-3, warmup_steps=20, epochs=8.0, eval_every=57, checkpoint_every=100
)


@dataclass(frozen=True)
class SFTSettings:
    """Every knob of the SFT stage.

    Attributes:
        train: optimisation settings (defaults measured on the demo: lr 5e-3, 8 epochs of
            batch 32, 20 warmup steps (~4%), cosine decay to 10%). Its `seed` is replaced by
            the stage's global seed.
        max_length: most tokens of chat prompt + completion + EOS; longer examples lose the
            start of the prompt first, then the end of the completion (default 256). With
            packing, also the length of a packed row.
        packing: concatenate examples into rows of up to `max_length` tokens, each example
            attending only to itself (default False). `train.batch_size` then counts rows.
        eval_batch_size: examples per forward pass in held-out evaluation (default 64).
        num_samples: held-out prompts answered by the trained model and logged to MLflow as
            `samples.json`, a quick look at fluency (default 8; 0 = none).
        sample_max_new_tokens: most tokens per sample (default 64).
    """

    train: TrainSettings = SFT_DEMO_TRAIN
    max_length: int = 256
    packing: bool = False
    eval_batch_size: int = 64
    num_samples: int = 8
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        require_minimums(
            "sft",
            self,
            {"max_length": 2, "eval_batch_size": 1, "num_samples": 0, "sample_max_new_tokens": 1},
        )


def require_aggregate(key: str, mode: object, coef_key: str, coef: object) -> None:
    """One error line unless `mode` is a reward aggregate and `coef` a number >= 0."""
    if mode not in REWARD_AGGREGATES:
        raise ValueError(f"{key} must be one of {', '.join(REWARD_AGGREGATES)}, got {mode!r}.")
    if not (is_number(coef) and math.isfinite(coef) and coef >= 0):
        raise ValueError(f"{coef_key} must be a finite number >= 0, got {coef!r}.")


# Chosen on the demo (0.9M-parameter Llama, 1350 training pairs, 2 CPU cores): one epoch of
# 43 steps (~50 s) with rpo_alpha 0.5 wins ~75-85% of sampled comparisons against the SFT model
# on the gold judge at a KL of ~3 nats; plain DPO (rpo_alpha 0) needs 2 epochs for a similar
# win rate, at a KL of 20-40 nats and less fluent text.
DPO_DEMO_TRAIN = TrainSettings(
    learning_rate=1e-3, warmup_steps=5, epochs=1.0, eval_every=20, checkpoint_every=20
)


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (Hu et al. 2021, LoRA, arXiv:2106.09685) through peft.

    Attributes:
        enabled: train adapters instead of all weights (default False).
        r: adapter rank (default 8).
        alpha: scaling numerator; the update is (alpha / r) · B A (default 16).
        dropout: dropout on the adapter input (default 0.0).
        target_modules: names of the linear layers that get adapters (default Llama's
            attention projections q_proj, k_proj, v_proj, o_proj).
    """

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise ValueError(f"lora.r must be at least 1, got {self.r}.")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module.")


@dataclass(frozen=True)
class DPOSettings:
    """Every knob of the DPO stage.

    Attributes:
        train: optimisation settings (defaults chosen on the demo: lr 1e-3, 1 epoch of
            batch 32, 5 warmup steps, cosine decay; held-out eval and a checkpoint every 20
            steps). Its `seed` is replaced by the stage's global seed.
        loss_type: sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023) | hinge
            (SLiC-HF, Zhao et al. 2023) | simpo (Meng et al. 2024; reference-free, no
            reference pass). Default sigmoid.
        beta: β, the implicit KL strength (default 0.1; for simpo the paper uses 2.0–2.5).
        label_smoothing: ε, conservative DPO's assumed label-flip rate (sigmoid or simpo;
            default 0).
        average_logprobs: score responses by mean token log-prob instead of the sum. None
            (default) = the paper's choice per loss type: False for sigmoid and hinge, True
            for ipo and simpo (simpo requires True).
        rpo_alpha: α of the RPO term α · token-mean NLL(chosen) (Pang et al. 2024,
            arXiv:2404.19733), against the drop of the chosen likelihood. Default 0.5: on
            the demo it keeps the policy within ~3 nats of the SFT model (plain DPO drifts
            20-40 nats into less fluent text) at a higher gold win rate. 0 = plain DPO.
        simpo_gamma_beta_ratio: SimPO's target margin γ / β (default 0.5).
        max_length: most tokens of prompt + response (+ EOS); longer pairs are truncated
            (prompt start first). Default 512.
        inference_batch_size: pairs per forward pass in the reference pass and held-out
            evaluation (default 64).
        lora: LoRA settings (off by default).
    """

    train: TrainSettings = DPO_DEMO_TRAIN
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    average_logprobs: bool | None = None
    rpo_alpha: float = 0.5
    simpo_gamma_beta_ratio: float = 0.5
    max_length: int = 512
    inference_batch_size: int = 64
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {self.loss_type!r}."
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid or simpo, not {self.loss_type!r}."
            )
        if self.loss_type == "simpo" and self.average_logprobs is False:
            raise ValueError("simpo always uses length-normalised log-probs; set average_logprobs.")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}.")
        if self.simpo_gamma_beta_ratio < 0:
            raise ValueError(
                f"simpo_gamma_beta_ratio must be >= 0, got {self.simpo_gamma_beta_ratio}."
            )
        require_minimums("policy.dpo", self, {"max_length": 2, "inference_batch_size": 1})

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference model (every type but SimPO)."""
        return self.loss_type != "simpo"

    @property
    def length_normalised(self) -> bool:
        """Whether responses are scored by mean token log-prob: `average_logprobs`, or when
        None the paper's choice (IPO, Azar et al. 2023, arXiv:2310.12036, and SimPO, Meng et
        al. 2024, arXiv:2405.14734, average; DPO and SLiC sum)."""
        if self.average_logprobs is None:
            return self.loss_type in LENGTH_NORMALISED_LOSS_TYPES
        return self.average_logprobs

    def pair_loss(self) -> PairLossFunction:
        """The loss of this run: (logp_sums, token_counts, reference_sums) -> `PairLoss`,
        with every knob of this section bound (`algorithms.preference`)."""
        from rlhf_core.algorithms import preference  # torch: imported when training starts

        if self.loss_type == "simpo":
            return partial(
                preference.simpo_pair_loss,
                beta=self.beta,
                gamma_beta_ratio=self.simpo_gamma_beta_ratio,
                label_smoothing=self.label_smoothing,
                rpo_alpha=self.rpo_alpha,
            )
        return partial(
            preference.reference_pair_loss,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            average_logprobs=self.length_normalised,
            rpo_alpha=self.rpo_alpha,
        )


OVEROPTIMISATION_JUDGES = ("auto", "gold", "judge")


@dataclass(frozen=True)
class PPOSettings:
    """Every knob of the PPO stage.

    Attributes:
        train: the PPO loop's knobs (rollouts, KL, advantages, losses, optimiser, schedule,
            evaluation and checkpoint cadence); see `PPOTrainSettings`.
        max_eval_prompts: most held-out prompts in the periodic evaluation (64); the first ones
            of the held-out split, so every evaluation uses the same prompts.
        scorer_batch_size: sequences per reward-model forward pass (64).
        overoptimisation_window: evaluations per window of the overoptimisation alarm (3):
            it fires when, over that many consecutive evaluations, the reward-model score's
            fitted change is above +`overoptimisation_epsilon` while the gold score's is below
            −`overoptimisation_epsilon` (`evaluation.overoptimisation`).
        overoptimisation_epsilon: the least fitted change across a window, in score units,
            that counts as a rise or a fall (0.05: above the noise of a gold mean over 64
            prompts at one seed).
        reward_aggregate: how the reward ensemble's member scores become PPO's reward, when
            the reward stage trained members (`reward.ensemble.members` > 1): mean, min or
            mean_minus_std (`algorithms.ensemble.conservative_reward`; default mean). With
            one member every choice is that model's score.
        reward_std_coef: λ of mean_minus_std, r̄ − λ·σ with σ the members' population std
            (default 1.0).
        overoptimisation_judge: whose score the alarm compares the proxy with: "gold" (the
            demo's gold judge), "judge" (the held-out reward model of `reward.judge`) or
            "auto" (default: gold where the data have one, else the held-out reward model
            when the reward stage trained one, else none and the alarm is off). Every judge
            there is scores the evaluations either way (`eval/<judge>_score_mean`).
    """

    train: PPOTrainSettings = field(default_factory=PPOTrainSettings)
    max_eval_prompts: int = 64
    scorer_batch_size: int = 64
    overoptimisation_window: int = 3
    overoptimisation_epsilon: float = 0.05
    reward_aggregate: str = "mean"
    reward_std_coef: float = 1.0
    overoptimisation_judge: str = "auto"

    def __post_init__(self) -> None:
        if self.overoptimisation_judge not in OVEROPTIMISATION_JUDGES:
            raise ValueError(
                f"policy.ppo.overoptimisation_judge must be one of "
                f"{', '.join(OVEROPTIMISATION_JUDGES)}, got {self.overoptimisation_judge!r}."
            )
        if not isinstance(self.train, PPOTrainSettings):
            raise ValueError("ppo train must be a PPOTrainSettings (the ppo.train section).")
        require_minimums(
            "policy.ppo",
            self,
            {"max_eval_prompts": 0, "scorer_batch_size": 1, "overoptimisation_window": 2},
        )
        epsilon = self.overoptimisation_epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
            raise ValueError(
                f"policy.ppo.overoptimisation_epsilon must be a number >= 0, got {epsilon!r}."
            )
        require_aggregate(
            "policy.ppo.reward_aggregate",
            self.reward_aggregate,
            "policy.ppo.reward_std_coef",
            self.reward_std_coef,
        )


def _default_sampling() -> SamplingSettings:
    # T = 1 with no top-k/top-p samples from the policies exactly as trained, which keeps the
    # Monte-Carlo KL a true KL. 64 tokens end the longest demo review (≤ 49 tokens with EOS).
    # Larger batches than generation's default: fewer, longer steps use a CPU's threads better.
    return SamplingSettings(max_new_tokens=64, temperature=1.0, batch_size=128)


@dataclass(frozen=True)
class EvaluateSettings:
    """Knobs of the evaluation stage (the `evaluate:` section of params.yaml).

    Attributes:
        sampling: how every policy samples (a `SamplingSettings` or a mapping of its fields);
            the same settings for all, each policy drawing from a random stream of its own
            (derived from the seed), so a win rate compares independent samples, and the
            bootstrap intervals resample whole prompts. KL to SFT is exact only at
            temperature 1 with top_k 0 and top_p 1 (the default).
        best_of_n: the n of each best-of-n baseline (each ≥ 2, distinct); () for none. Costs
            max(n) extra SFT samples per evaluated response.
        samples_per_prompt: responses per prompt and policy (more samples, tighter estimates).
        max_prompts: evaluate only the first N held-out prompts; None uses all of them.
        samples_in_report: prompts shown side by side in samples.md (first sample of each).
        batch_size: sequences per forward pass when scoring with the reward model and when
            computing log-probabilities (generation uses `sampling.batch_size`).
        bootstrap: add 95% percentile-bootstrap intervals of the win rates
            (`<metric>_ci_low` / `_ci_high`).
        missing_eos_penalty: subtracted from the reward-model score of a sampled response that
            never emitted EOS (1.0, as PPO's); it also steers best-of-n away from them.
        unfinished_score: when set, the reward-model score of every such response instead.
        sanity_prompts: out-of-task questions, each with a text its answer must contain
            (case-insensitive), e.g. {"What is the capital of France?": "Paris"}; SFT and
            each policy answer them greedily (`evaluation.sanity`): a pretrained model tuned
            too hard on the task forgets the rest. {} (the default) skips them.
        sanity_max_new_tokens: most tokens of a sanity answer (64).
        best_of_n_aggregate: how the reward ensemble's member scores pick the best of n,
            when the reward stage trained members: mean, min or mean_minus_std
            (`algorithms.ensemble.conservative_reward`; default mean). The reported
            rm_score of every response, best-of-n included, stays the members' mean.
        best_of_n_std_coef: λ of mean_minus_std in the best-of-n choice (default 1.0).
    """

    sampling: SamplingSettings = field(default_factory=_default_sampling)
    best_of_n: tuple[int, ...] = (4, 16)
    samples_per_prompt: int = 1
    max_prompts: int | None = None
    samples_in_report: int = 20
    batch_size: int = 64
    bootstrap: bool = True
    missing_eos_penalty: float = 1.0
    unfinished_score: float | None = None
    sanity_prompts: Mapping[str, str] = field(default_factory=dict)
    sanity_max_new_tokens: int = 64
    best_of_n_aggregate: str = "mean"
    best_of_n_std_coef: float = 1.0

    def __post_init__(self) -> None:
        # params.yaml gives plain mappings and lists; keep the typed forms.
        if isinstance(self.sampling, Mapping):
            object.__setattr__(self, "sampling", SamplingSettings(**self.sampling))
        if not isinstance(self.sampling, SamplingSettings):
            raise ValueError(f"sampling must be sampling settings but is {self.sampling!r}.")
        if isinstance(self.best_of_n, list):
            object.__setattr__(self, "best_of_n", tuple(self.best_of_n))
        if not isinstance(self.best_of_n, tuple) or not all(
            is_int(n) and n >= 2 for n in self.best_of_n
        ):
            raise ValueError(
                f"best_of_n must be a list of integers of at least 2 but is {self.best_of_n!r}; "
                "best-of-1 is the SFT policy itself."
            )
        if len(set(self.best_of_n)) != len(self.best_of_n):
            raise ValueError(f"best_of_n lists an n twice: {self.best_of_n!r}.")
        require_minimums(
            "evaluate", self, {"samples_per_prompt": 1, "samples_in_report": 1, "batch_size": 1}
        )
        if self.max_prompts is not None and (not is_int(self.max_prompts) or self.max_prompts < 1):
            raise ValueError(
                f"max_prompts must be a positive integer or null (all prompts) but is "
                f"{self.max_prompts!r}."
            )
        if not isinstance(self.bootstrap, bool):
            raise ValueError(f"bootstrap must be true or false but is {self.bootstrap!r}.")
        if not (is_number(self.missing_eos_penalty) and self.missing_eos_penalty >= 0):
            raise ValueError(
                f"evaluate.missing_eos_penalty must be a number >= 0, got "
                f"{self.missing_eos_penalty!r}."
            )
        require_finite_or_none("evaluate.unfinished_score", self.unfinished_score)
        if not isinstance(self.sanity_prompts, Mapping) or not all(
            isinstance(key, str) and key.strip() and isinstance(value, str) and value.strip()
            for key, value in self.sanity_prompts.items()
        ):
            raise ValueError(
                "evaluate.sanity_prompts must map each question to the text its answer must "
                f"contain, both non-empty strings, got {self.sanity_prompts!r}."
            )
        require_minimums("evaluate", self, {"sanity_max_new_tokens": 1})
        require_aggregate(
            "evaluate.best_of_n_aggregate",
            self.best_of_n_aggregate,
            "evaluate.best_of_n_std_coef",
            self.best_of_n_std_coef,
        )
