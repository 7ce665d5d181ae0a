"""The PPO loop for RLHF: roll out, score, shape rewards, estimate advantages, update.

One iteration, straight-line (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022,
arXiv:2203.02155; the loop of Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO", arXiv:2403.17031):

1. take `rollout_batch_size` prompts (a seeded permutation of the prompt set, cycled) and sample
   one response each from the policy (`rlhf_core.generation.generate`, KV cache, inference mode);
2. in inference mode: token log-probs of the policy ("old") and the frozen reference, values of
   the value head, and one score per response from the scorer (the reward model); responses
   that never emitted EOS lose `missing_eos_penalty`;
3. per-token rewards `−β·KL_t` plus the score at the last response token (`shape_rewards`),
   GAE advantages and returns (`compute_gae`), advantages whitened over the batch (`whiten`);
4. `ppo_epochs` passes over shuffled minibatches: clipped policy loss + `vf_coef` · clipped
   value loss − `entropy_coef` · entropy, gradient accumulation over micro-batches, clip, step;
5. the KL controller sees the iteration's mean per-sequence KL.

With `advantage_estimator` "grpo" or "rloo" there is no critic: each prompt is sampled
`group_size` times and every token of a response gets that response's group advantage
(`group_advantages` of score − β·Σ_t KL_t, or of the score alone with `kl_in_reward: false`);
the value head is neither run nor trained.

All math comes from `rlhf_core.algorithms` (`ppo`, `logprobs`); this module only wires it.
Randomness is derived from `(seed, iteration)`, and a checkpoint holds the policy with its
value head, the optimizer, the scheduler, the KL coefficient, the RNG states and the history,
so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.algorithms.logprobs import shift_for_causal_lm, token_entropy, token_logprobs
from rlhf_core.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    group_advantages,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from rlhf_core.generation import Rollout, SamplingSettings, generate, score_token_ids
from rlhf_core.models.heads import PolicyWithValueHead, RewardModel, position_ids_from_mask
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import param_groups, progress_bar, seed_everything
from rlhf_core.training.schedule import build_scheduler
from rlhf_core.training.settings import PPOTrainSettings

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Scorer = Callable[[Rollout], torch.Tensor]  # rollout -> one score per response, (n,)


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


@dataclass
class PPOTrainResult:
    """What a PPO run did: per-iteration history, evaluations, time and where it resumed."""

    iterations: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Rollouts and scoring
# --------------------------------------------------------------------------------------------


def reward_model_scorer(reward_model: RewardModel, pad_id: int, batch_size: int = 64) -> Scorer:
    """A scorer reading the reward model's score at the end of each sampled sequence.

    The reward model sees exactly the sampled tokens, `prompt_ids + response_ids`
    (`score_token_ids`), so a response cut by the length limit is scored as it is.
    """

    def score_rollout(rollout: Rollout) -> torch.Tensor:
        sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids, strict=True)]
        return score_token_ids(reward_model, sequences, pad_id, batch_size)

    return score_rollout


def derived_seed(seed: int, stream: str, index: int = 0) -> int:
    """A seed for one random stream of a run (`stream`, `index`), independent of the others.

    The first 8 bytes of sha256(f"{seed}/{stream}/{index}"), as a non-negative int63.
    """
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


def _forward_token_stats(
    model: PolicyWithValueHead | PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_values: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Aligned `(logps, values or None, logits, mask)` for one batch; gradients flow.

    logps, values, mask: (b, seq - 1); logits (b, seq - 1, vocab), tempered.
    """
    if isinstance(model, PolicyWithValueHead):
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
def _inference_token_stats(
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
            logps, values, _, _ = _forward_token_stats(
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
    policy: PolicyWithValueHead,
    reference: PreTrainedModel,
    scorer: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    kl_coef: float,
    seed: int,
) -> tuple[Experience, dict[str, float]]:
    """Sample responses for `prompts` and turn them into PPO training tensors.

    For grpo/rloo each prompt is repeated `group_size` times in a row (the groups of
    `group_advantages`). Returns the experience and the seconds spent generating and scoring
    (`generation_s`, `scoring_s`; scoring includes the log-prob and value passes).
    """
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
    old_logps, values = _inference_token_stats(
        policy, tensors, settings.temperature, with_values, forward_batch
    )
    ref_logps, _ = _inference_token_stats(
        reference, tensors, settings.temperature, False, forward_batch
    )
    raw_scores = scorer(rollout).to(device=device, dtype=torch.float32)
    if raw_scores.shape != (len(rollout),):
        raise ValueError(
            f"The scorer returned shape {tuple(raw_scores.shape)} for {len(rollout)} responses; "
            "it must return one score per response."
        )
    ended = torch.tensor(rollout.ended, device=device)
    scores = raw_scores - settings.missing_eos_penalty * (~ended).float()
    mask = tensors["response_mask"][:, 1:]  # (n, seq - 1)
    rewards, kl, advantages, returns = rewards_and_advantages(
        scores, old_logps, ref_logps, values, mask, settings, kl_coef
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(rewards, kl, advantages, returns)` of a rollout: the `algorithms.ppo` functions, wired.

    gae: `shape_rewards` (−β·KL_t per response token, the score on the last one), then
    `compute_gae` against `values`. grpo/rloo: each response's shaped reward summed over its
    tokens (score − β Σ_t KL_t; the score alone with `kl_in_reward: false`) goes through
    `group_advantages` and is spread over the response's tokens; returns are None. Either way
    the advantages are then whitened over the batch if `whiten_advantages`. Token tensors are
    `(n, seq - 1)`, scores `(n,)`.
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
        advantages = whiten(advantages, mask)
    return rewards, kl, advantages, returns


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


def _micro_batch_loss(
    policy: PolicyWithValueHead,
    experience: Experience,
    rows: torch.Tensor,
    settings: PPOTrainSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Token-mean loss of one micro-batch, its detached stats and its response-token count."""
    mask = experience.mask[rows]
    logps, values, logits, _ = _forward_token_stats(
        policy,
        experience.input_ids[rows],
        experience.attention_mask[rows],
        torch.nn.functional.pad(mask, (1, 0)),
        settings.temperature,
        with_values=not settings.uses_groups,
    )
    policy_loss, policy_stats = ppo_policy_loss(
        logps, experience.old_logps[rows], experience.advantages[rows], mask, settings.clip_range
    )
    stats = {
        "loss/policy": policy_loss.detach(),
        "policy/clip_fraction": policy_stats["clip_fraction"],
        "policy/approx_kl": policy_stats["approx_kl"],
    }
    loss = policy_loss
    if values is not None:
        value_loss, value_stats = ppo_value_loss(
            values,
            experience.values[rows],
            experience.returns[rows],
            mask,
            settings.clip_range_value,
        )
        loss = loss + settings.vf_coef * value_loss
        stats["value/loss"] = value_loss.detach()
        stats["value/clip_fraction"] = value_stats["value_clip_fraction"]
    with torch.set_grad_enabled(settings.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = masked_mean(token_entropy(logits), mask)
    if settings.entropy_coef > 0:
        loss = loss - settings.entropy_coef * entropy
    stats["policy/entropy"] = entropy.detach()
    stats["loss/total"] = loss.detach()
    return loss, stats, int(mask.sum())


def _update(
    policy: PolicyWithValueHead,
    experience: Experience,
    settings: PPOTrainSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch updates; returns token-weighted means of the stats."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    n = experience.input_ids.shape[0]
    micro = settings.micro_batch_size_or_minibatch
    totals: dict[str, float] = {}
    total_tokens, grad_norms = 0, []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.minibatch_size):
            minibatch = order[start : start + settings.minibatch_size]
            minibatch_tokens = int(experience.mask[minibatch].sum())
            for micro_start in range(0, len(minibatch), micro):
                rows = minibatch[micro_start : micro_start + micro].to(experience.mask.device)
                loss, stats, tokens = _micro_batch_loss(policy, experience, rows, settings)
                # Weighting each micro-batch's token mean by its share of the minibatch's
                # tokens makes the accumulated gradient the minibatch's exact token mean.
                (loss * (tokens / minibatch_tokens)).backward()
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value) * tokens
                total_tokens += tokens
            grad_norms.append(_clip_gradients(trainable, settings.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    metrics = {key: value / total_tokens for key, value in totals.items()}
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics


def _clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping); return the norm before."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    grads = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_policy(
    policy: PolicyWithValueHead,
    reference: PreTrainedModel,
    scorer: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    seed: int,
) -> dict[str, float]:
    """Held-out metrics of responses sampled at the training temperature with a fixed seed.

    `score_mean` (raw scorer output), `kl_mean` (per-sequence Σ_t log π − log π_ref),
    `length_mean` (response tokens) and `ended_fraction`. The same seed at every evaluation
    keeps the curve free of sampling noise that is not due to the policy.
    """
    sampling = SamplingSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        batch_size=len(prompts),
    )
    rollout = generate(policy, tokenizer, prompts, sampling, seed=seed)
    padded = rollout.to_padded(tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    tensors = {k: v.to(device) for k, v in padded.items() if isinstance(v, torch.Tensor)}
    batch = settings.micro_batch_size_or_minibatch
    logps, _ = _inference_token_stats(policy, tensors, settings.temperature, False, batch)
    ref_logps, _ = _inference_token_stats(reference, tensors, settings.temperature, False, batch)
    scores = scorer(rollout).float()
    return {
        "score_mean": float(scores.mean()),
        "kl_mean": float((logps - ref_logps).sum(dim=1).mean()),
        "length_mean": sum(len(ids) for ids in rollout.response_ids) / len(rollout),
        "ended_fraction": sum(rollout.ended) / len(rollout),
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _iteration_metrics(experience: Experience, kl_coef: float) -> dict[str, float]:
    """Rollout statistics of one iteration (before the update)."""
    mask = experience.mask.bool()
    sequence_kl = torch.where(mask, experience.old_logps - experience.ref_logps, 0.0).sum(dim=1)
    metrics = {
        "reward/score_mean": float(experience.raw_scores.mean()),
        "reward/total_mean": float(experience.rewards.sum(dim=1).mean()),
        "kl/mean": float(sequence_kl.mean()),
        "kl/coef": kl_coef,
        "response/length_mean": float(mask.sum(dim=1).float().mean()),
        "response/ended_fraction": float(experience.ended.float().mean()),
    }
    if experience.values is not None:
        metrics["value/mean"] = float(masked_mean(experience.values, experience.mask))
    return metrics


def train_ppo(
    policy: PolicyWithValueHead,
    reference: PreTrainedModel,
    scorer: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    *,
    seed: int = 0,
    eval_prompts: Sequence[Messages] = (),
    checkpoints: CheckpointManager | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
) -> PPOTrainResult:
    """Train `policy` (LM + value head, in place) with PPO against a frozen reference.

    Resumes from the newest matching checkpoint in `checkpoints`, if any. `on_log(iteration,
    metrics)` is called after every iteration (1-based), `on_eval(iteration, metrics)` after
    every evaluation on `eval_prompts` (iteration 0 = before training; none without prompts).
    The reference is put in eval mode with gradients off; the scorer must not need gradients.
    The policy stays in eval mode (no dropout) while it trains.
    """
    if not prompts:
        raise ValueError("There are no prompts to roll out; the prompts set is empty.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; call ensure_pad_token(tokenizer).")
    seed_everything(seed)
    reference.eval().requires_grad_(False)
    # Dropout stays off throughout (as in TRL's PPO): sampling, old log-probs and the update
    # then see one policy, so the first minibatch's probability ratio is exactly 1.
    policy.eval()
    optimizer = torch.optim.AdamW(
        param_groups(policy, settings.weight_decay),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
    )
    scheduler = build_scheduler(
        optimizer,
        settings.optimizer_steps,
        settings.warmup_steps,
        settings.schedule,
        settings.min_lr_ratio,
    )
    controller = (
        AdaptiveKLController(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)
        if settings.adaptive_kl
        else FixedKLController(settings.init_kl_coef)
    )
    result = PPOTrainResult(iterations=0, resumed_from=0)
    if checkpoints is not None and (latest := checkpoints.latest()) is not None:
        state = checkpoints.load(latest, policy, optimizer, scheduler)
        controller.value = float(state.extra["kl_coef"])
        result = PPOTrainResult(
            iterations=state.global_step,
            resumed_from=state.global_step,
            history=list(state.extra["history"]),
            eval_history=list(state.extra["eval_history"]),
            train_seconds=float(state.extra["train_seconds"]),
        )
        log.info("resuming PPO from %s (iteration %d)", latest, state.global_step)

    def run_eval(iteration: int) -> None:
        if not eval_prompts:
            return
        metrics = evaluate_policy(
            policy, reference, scorer, tokenizer, eval_prompts, settings, derived_seed(seed, "eval")
        )
        result.eval_history.append({"step": iteration, **metrics})
        if on_eval is not None:
            on_eval(iteration, metrics)

    if result.iterations == 0:
        run_eval(0)
    with progress_bar(show_progress) as bar:
        task = bar.add_task(
            "ppo", total=settings.iterations, completed=result.iterations, status=""
        )
        for iteration in range(result.iterations, settings.iterations):
            metrics = _iteration(
                policy,
                reference,
                scorer,
                tokenizer,
                prompts,
                settings,
                controller,
                optimizer,
                scheduler,
                iteration,
                seed,
            )
            result.iterations = iteration + 1
            result.train_seconds += metrics["time/iteration_s"]
            result.history.append({"step": iteration + 1, **metrics})
            if on_log is not None:
                on_log(iteration + 1, metrics)
            bar.update(task, advance=1, status=_status(metrics))
            is_last = iteration + 1 == settings.iterations
            if is_last or (settings.eval_every and (iteration + 1) % settings.eval_every == 0):
                run_eval(iteration + 1)
            if (
                checkpoints is not None
                and settings.checkpoint_every
                and (iteration + 1) % settings.checkpoint_every == 0
                and not is_last
            ):
                extra = {
                    "kl_coef": controller.value,
                    "history": result.history,
                    "eval_history": result.eval_history,
                    "train_seconds": result.train_seconds,
                }
                checkpoints.save(iteration + 1, policy, optimizer, scheduler, extra)
    result.final_eval = (
        {k: v for k, v in result.eval_history[-1].items() if k != "step"}
        if result.eval_history
        else {}
    )
    return result


def _iteration(
    policy: PolicyWithValueHead,
    reference: PreTrainedModel,
    scorer: Scorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    controller: AdaptiveKLController | FixedKLController,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    seed: int,
) -> dict[str, float]:
    """One rollout + update; returns the iteration's metrics."""
    started = time.perf_counter()
    indices = iteration_prompt_indices(
        len(prompts), settings.prompts_per_iteration, iteration, seed
    )
    kl_coef = controller.value
    experience, timings = make_experience(
        policy,
        reference,
        scorer,
        tokenizer,
        [prompts[i] for i in indices],
        settings,
        kl_coef,
        seed=derived_seed(seed, "rollout", iteration),
    )
    metrics = _iteration_metrics(experience, kl_coef)
    update_started = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    generator = torch.Generator().manual_seed(derived_seed(seed, "shuffle", iteration))
    metrics.update(_update(policy, experience, settings, optimizer, scheduler, generator))
    finished = time.perf_counter()
    controller.update(metrics["kl/mean"], settings.rollout_batch_size)
    seconds = finished - started
    tokens = int(experience.attention_mask.sum())
    metrics.update(
        {
            "loss": metrics["loss/total"],
            "lr": lr,
            "time/generation_s": timings["generation_s"],
            "time/scoring_s": timings["scoring_s"],
            "time/update_s": finished - update_started,
            "time/iteration_s": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }
    )
    return metrics


def _status(metrics: dict[str, float]) -> str:
    return f"score {metrics['reward/score_mean']:+.3f} kl {metrics['kl/mean']:.2f}"
