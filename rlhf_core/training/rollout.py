"""PPO experience: sample responses, score them, and turn the scores into per-token rewards,
advantages and returns (steps 1–3 of `training.ppo_trainer`'s loop).

Rollouts run under inference mode with the KV cache (`rlhf_core.generation.generate`); the
policy's, the reference's and the value head's token statistics come from one forward pass
each; the rewards are `−β·KL_t` plus the score at the last response token (Ziegler et al. 2019,
arXiv:1909.08593), or group advantages for GRPO/RLOO. All math is `rlhf_core.algorithms`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.algorithms.ensemble import conservative_reward, ensemble_std
from rlhf_core.algorithms.logprobs import shift_for_causal_lm, token_logprobs
from rlhf_core.algorithms.ppo import (
    compute_gae,
    group_advantages,
    penalise_unfinished,
    shape_rewards,
    whiten,
)
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.generation import Rollout, SamplingSettings, derived_seed, generate
from rlhf_core.models.heads import PolicyWithValueHead, RewardModel, position_ids_from_mask
from rlhf_core.scoring import score_token_ids, score_token_ids_members

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Scorer = Callable[[Rollout], torch.Tensor]  # rollout -> one score per response, (n,)
SumReducer = Callable[[list[float]], list[float]]  # element-wise sums over every process


class PPOModels(NamedTuple):
    """The models of a PPO run: the policy being trained (with its value head), the frozen
    reference, the scorer of whole responses and the tokenizer they share."""

    policy: PolicyWithValueHead
    reference: PreTrainedModel
    scorer: Scorer
    tokenizer: PreTrainedTokenizerBase


@dataclass
class Experience:
    """One iteration's rollout as training tensors; per-token tensors are aligned with actions.

    Token tensors are `(n, seq - 1)`: entry t belongs to the token `input_ids[:, t + 1]`, scored
    by the logits at position t (see `shift_for_causal_lm`); `mask` is 1 exactly on response
    tokens (EOS included). `values` is None for the group estimators.
    """

    rollout: Rollout
    input_ids: torch.Tensor  # (n, seq) long, [pad… prompt | response …pad]
    attention_mask: torch.Tensor  # (n, seq) long
    mask: torch.Tensor  # (n, seq - 1) long, response tokens
    old_logps: torch.Tensor  # (n, seq - 1) policy log-probs at sampling time
    ref_logps: torch.Tensor  # (n, seq - 1) reference log-probs
    values: torch.Tensor | None  # (n, seq - 1) value estimates, None without a critic
    raw_scores: torch.Tensor  # (n,) scorer output
    scores: torch.Tensor  # (n,) after the missing-EOS penalty
    kl: torch.Tensor  # (n, seq - 1) per-token KL estimate (kl_estimator), 0 off the mask
    rewards: torch.Tensor  # (n, seq - 1) shaped per-token rewards
    advantages: torch.Tensor  # (n, seq - 1), whitened if configured
    returns: torch.Tensor | None  # (n, seq - 1) value targets, None without a critic
    ended: torch.Tensor  # (n,) bool, response emitted EOS

    def select(self, rows: Sequence[int]) -> Experience:
        """The experience of the rows at `rows`, in that order (the columns stay as they are)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        return Experience(
            rollout=self.rollout.select(list(rows)),
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            mask=self.mask[index],
            old_logps=self.old_logps[index],
            ref_logps=self.ref_logps[index],
            values=pick(self.values),
            raw_scores=self.raw_scores[index],
            scores=self.scores[index],
            kl=self.kl[index],
            rewards=self.rewards[index],
            advantages=self.advantages[index],
            returns=pick(self.returns),
            ended=self.ended[index],
        )


def reward_model_scorer(reward_model: RewardModel, pad_id: int, batch_size: int = 64) -> Scorer:
    """A scorer reading the reward model's score at the end of each sampled sequence.

    The reward model sees exactly the sampled tokens, `prompt_ids + response_ids`
    (`score_token_ids`), so a response cut by the length limit is scored as it is.
    """

    def score_rollout(rollout: Rollout) -> torch.Tensor:
        sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids, strict=True)]
        return score_token_ids(reward_model, sequences, pad_id, batch_size)

    return score_rollout


class EnsembleScorer:
    """A scorer reading every reward-ensemble member's score at the end of each sampled
    sequence and aggregating them (`algorithms.ensemble.conservative_reward`: mean,
    mean_minus_std with λ = `std_coef`, or min; Coste et al. 2023, arXiv:2310.02743).

    `last_std_mean` is the mean over responses of the members' population std on the last
    rollout scored (None before the first): how much the members disagree where the policy
    now samples. Costs one reward-model pass per member.
    """

    def __init__(
        self,
        members: Sequence[RewardModel],
        pad_id: int,
        batch_size: int = 64,
        aggregate: str = "mean",
        std_coef: float = 1.0,
    ) -> None:
        if not members:
            raise ValueError("A reward ensemble scorer needs at least one reward model.")
        self.members = list(members)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.aggregate = aggregate
        self.std_coef = std_coef
        self.last_std_mean: float | None = None

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids, strict=True)]
        scores = score_token_ids_members(self.members, sequences, self.pad_id, self.batch_size)
        self.last_std_mean = float(ensemble_std(scores).mean())  # scores: (members, n)
        return conservative_reward(scores, self.aggregate, self.std_coef)


def reward_scorer(
    members: Sequence[RewardModel],
    pad_id: int,
    batch_size: int = 64,
    aggregate: str = "mean",
    std_coef: float = 1.0,
) -> Scorer:
    """PPO's scorer for the reward stage's members (`scoring.load_reward_members`): the one
    model's `reward_model_scorer` when there is one (every aggregate of one score is that
    score), an `EnsembleScorer` of all of them otherwise."""
    if len(members) == 1:
        return reward_model_scorer(members[0], pad_id, batch_size)
    return EnsembleScorer(members, pad_id, batch_size, aggregate, std_coef)


def with_ensemble_std(
    on_log: Callable[[int, dict[str, float]], None], scorer: Scorer
) -> Callable[[int, dict[str, float]], None]:
    """`on_log` that also logs `reward/ensemble_std_mean` from an `EnsembleScorer`.

    The PPO loop calls `on_log` right after an iteration's rollout was scored and before any
    evaluation, so the scorer's last std is that rollout's (on several processes, the main
    process's share). Curves replayed on a resume come before any scoring and go unchanged.
    Any other scorer gets `on_log` back as it is.
    """
    if not isinstance(scorer, EnsembleScorer):
        return on_log

    def log_with_std(step: int, metrics: dict[str, float]) -> None:
        if scorer.last_std_mean is not None:
            metrics = {**metrics, "reward/ensemble_std_mean": scorer.last_std_mean}
        on_log(step, metrics)

    return log_with_std


def iteration_prompt_indices(num_prompts: int, count: int, iteration: int, seed: int) -> list[int]:
    """Indices of the `count` prompts of iteration `iteration` (0-based).

    The prompt set is walked in a seeded random order, pass after pass (a fresh permutation
    per pass), so every prompt is used once before any is used twice. Pure: no state to save.
    """
    if num_prompts < 1:
        raise ValueError("There are no prompts to roll out; the prompts set is empty.")
    indices, permutations = [], {}
    for position in range(iteration * count, (iteration + 1) * count):
        pass_index, offset = divmod(position, num_prompts)
        if pass_index not in permutations:
            generator = torch.Generator().manual_seed(derived_seed(seed, "prompts", pass_index))
            permutations[pass_index] = torch.randperm(num_prompts, generator=generator).tolist()
        indices.append(permutations[pass_index][offset])
    return indices


def _temperature_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def forward_token_stats(
    model: PolicyWithValueHead | PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_values: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Aligned `(logps, values or None, logits, mask)` for one batch; gradients flow.

    `model` may be a policy wrapped for data-parallel training (its `.module` is the policy):
    the wrapper's own forward must run, since it is what synchronises the gradients.
    logps, values, mask: (b, seq - 1); logits (b, seq - 1, vocab), tempered.
    """
    if isinstance(getattr(model, "module", model), PolicyWithValueHead):
        logits, values = model(input_ids, attention_mask)  # (b, seq, vocab), (b, seq)
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits
        values = None
    logits = _temperature_logits(logits, temperature)
    shifted_logits, labels, mask = shift_for_causal_lm(logits, input_ids, response_mask)
    logps = token_logprobs(shifted_logits, labels, mask=mask)  # (b, seq - 1)
    values = values[:, :-1] if with_values and values is not None else None
    return logps, values, shifted_logits, mask


@torch.inference_mode()
def inference_token_stats(
    model: PolicyWithValueHead | PreTrainedModel,
    padded: dict[str, torch.Tensor],
    temperature: float,
    with_values: bool,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and values) for every row of a padded rollout, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    logps_parts, value_parts = [], []
    try:
        for start in range(0, padded["input_ids"].shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logps, values, _, _ = forward_token_stats(
                model,
                padded["input_ids"][rows],
                padded["attention_mask"][rows],
                padded["response_mask"][rows],
                temperature,
                with_values,
            )
            logps_parts.append(logps.float())
            if values is not None:
                value_parts.append(values.float())
    finally:
        model.train(was_training)
    values = torch.cat(value_parts) if value_parts else None
    return torch.cat(logps_parts), values


def make_experience(
    models: PPOModels,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    kl_coef: float,
    seed: int,
    reduce_sums: SumReducer | None = None,
) -> tuple[Experience, dict[str, float]]:
    """Sample responses for `prompts` and turn them into PPO training tensors.

    For grpo/rloo each prompt is repeated `group_size` times in a row (the groups of
    `group_advantages`). Returns the experience and the seconds spent generating and scoring
    (`generation_s`, `scoring_s`; scoring includes the log-prob and value passes).
    When the iteration's prompts are split across processes, `reduce_sums` (a collective,
    see `rewards_and_advantages`) whitens over every process's tokens; nothing else here
    communicates.
    """
    policy, reference, scorer, tokenizer = models
    if settings.uses_groups:
        prompts = [prompt for prompt in prompts for _ in range(settings.group_size)]
    started = time.perf_counter()
    sampling = SamplingSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        batch_size=len(prompts),
    )
    rollout = generate(policy, tokenizer, prompts, sampling, seed=seed)
    generated = time.perf_counter()
    padded = rollout.to_padded(tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    tensors = {k: v.to(device) for k, v in padded.items() if isinstance(v, torch.Tensor)}
    forward_batch = settings.micro_batch_size_or_minibatch
    with_values = not settings.uses_groups
    old_logps, values = inference_token_stats(
        policy, tensors, settings.temperature, with_values, forward_batch
    )
    ref_logps, _ = inference_token_stats(
        reference, tensors, settings.temperature, False, forward_batch
    )
    raw_scores = scorer(rollout).to(device=device, dtype=torch.float32)
    if raw_scores.shape != (len(rollout),):
        raise ValueError(
            f"The scorer returned shape {tuple(raw_scores.shape)} for {len(rollout)} responses; "
            "it must return one score per response."
        )
    ended = torch.tensor(rollout.ended, device=device)
    scores = penalise_unfinished(
        raw_scores, ended, settings.missing_eos_penalty, settings.unfinished_score
    )
    mask = tensors["response_mask"][:, 1:]  # (n, seq - 1)
    rewards, kl, advantages, returns = rewards_and_advantages(
        scores, old_logps, ref_logps, values, mask, settings, kl_coef, reduce_sums
    )
    experience = Experience(
        rollout=rollout,
        input_ids=tensors["input_ids"],
        attention_mask=tensors["attention_mask"],
        mask=mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        values=values,
        raw_scores=raw_scores,
        scores=scores,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        ended=ended,
    )
    return experience, {
        "generation_s": generated - started,
        "scoring_s": time.perf_counter() - generated,
    }


def rewards_and_advantages(
    scores: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    settings: PPOTrainSettings,
    kl_coef: float,
    reduce_sums: SumReducer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(rewards, kl, advantages, returns)` of a rollout: the `algorithms.ppo` functions, wired.

    gae: `shape_rewards` (−β·KL_t per response token, the score on the last one), then
    `compute_gae` against `values`, whitened over the batch's response tokens if
    `whiten_advantages`. grpo/rloo: each response's shaped reward summed over its tokens
    (score − β Σ_t KL_t; the score alone with `kl_in_reward: false`) goes through
    `group_advantages` and is spread over the response's tokens as the papers define it, with
    no further whitening (re-whitening over tokens would give a group of equal rewards a
    non-zero push, weighted by response lengths); returns are None. Token tensors are
    `(n, seq - 1)`, scores `(n,)`.

    `reduce_sums` (element-wise sums over every process, a collective) is given when the rollout
    is split across processes: GAE advantages are then whitened with the mean and variance of
    every process's tokens. Groups never straddle processes, so group advantages need none.
    """
    use_kl = kl_coef if (not settings.uses_groups or settings.kl_in_reward) else 0.0
    rewards, kl = shape_rewards(scores, old_logps, ref_logps, mask, use_kl, settings.kl_estimator)
    if settings.uses_groups:
        sequence_rewards = rewards.sum(dim=1)  # (n,)
        per_sequence = group_advantages(
            sequence_rewards, settings.group_size, settings.advantage_estimator
        )
        advantages = per_sequence[:, None] * mask.float()  # (n, seq - 1)
        returns = None
    else:
        if values is None:
            raise ValueError("GAE needs the value head's values; pass values for every token.")
        advantages, returns = compute_gae(rewards, values, mask, settings.gamma, settings.lam)
        if settings.whiten_advantages:
            advantages = whiten(advantages, mask, reduce_sums=reduce_sums)
    return rewards, kl, advantages, returns
