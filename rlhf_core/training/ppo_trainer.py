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

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_core.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    masked_mean,
)
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.generation import SamplingSettings, derived_seed, generate
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.distributed import reduce_named_sums, reduce_sums, shard
from rlhf_core.training.loop import param_groups, progress_bar, replay_history, seed_everything
from rlhf_core.training.ppo_update import update
from rlhf_core.training.rollout import (
    Experience,
    Messages,
    PPOModels,
    Scorer,
    inference_token_stats,
    iteration_prompt_indices,
    make_experience,
)
from rlhf_core.training.schedule import build_scheduler

log = logging.getLogger(__name__)


@dataclass
class PPOTrainResult:
    """What a PPO run did: per-iteration history, evaluations, time and where it resumed."""

    iterations: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0

    @property
    def global_step(self) -> int:
        """Iterations done: the step of PPO's curves."""
        return self.iterations


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_policy(
    models: PPOModels,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    seed: int,
    judges: Mapping[str, Scorer] | None = None,
) -> dict[str, float]:
    """Held-out metrics of responses sampled at the training temperature with a fixed seed.

    `score_mean` (raw scorer output), `kl_mean` (per-sequence Σ_t log π − log π_ref),
    `length_mean` (response tokens) and `ended_fraction`; for each of `judges` ({name:
    scorer}, judges the scorer never saw: the demo's gold judge as "gold", a held-out reward
    model as "judge") also `<name>_score_mean` of the same responses, so proxy and judge can
    be compared step by step (overoptimisation). The
    same seed at every evaluation keeps the curve free of sampling noise that is not due to
    the policy.
    """
    policy, reference, scorer, tokenizer = models
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
    logps, _ = inference_token_stats(policy, tensors, settings.temperature, False, batch)
    ref_logps, _ = inference_token_stats(reference, tensors, settings.temperature, False, batch)
    scores = scorer(rollout).float()
    metrics = {
        "score_mean": float(scores.mean()),
        "kl_mean": float((logps - ref_logps).sum(dim=1).mean()),
        "length_mean": sum(len(ids) for ids in rollout.response_ids) / len(rollout),
        "ended_fraction": sum(rollout.ended) / len(rollout),
    }
    for name, judge in (judges or {}).items():
        metrics[f"{name}_score_mean"] = float(judge(rollout).float().mean())
    return metrics


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _iteration_metrics(
    experience: Experience, kl_coef: float, accelerator: Any = None
) -> dict[str, float]:
    """Rollout statistics of one iteration (before the update), over every process's rows."""
    mask = experience.mask.bool()
    sequence_kl = torch.where(mask, experience.old_logps - experience.ref_logps, 0.0).sum(dim=1)
    if accelerator is None or accelerator.num_processes == 1:
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
    # Sums over every process divided by global counts: shards may differ in size, so a mean
    # of per-process means would weight their rows unequally.
    sums = {
        "rows": float(mask.shape[0]),
        "tokens": float(mask.sum()),
        "score": float(experience.raw_scores.double().sum()),
        "total": float(experience.rewards.double().sum()),
        "kl": float(sequence_kl.double().sum()),
        "ended": float(experience.ended.sum()),
    }
    if experience.values is not None:
        sums["value"] = float(torch.where(mask, experience.values.double(), 0.0).sum())
    total = reduce_named_sums(accelerator, sums)
    metrics = {
        "reward/score_mean": total["score"] / total["rows"],
        "reward/total_mean": total["total"] / total["rows"],
        "kl/mean": total["kl"] / total["rows"],
        "kl/coef": kl_coef,
        "response/length_mean": total["tokens"] / total["rows"],
        "response/ended_fraction": total["ended"] / total["rows"],
    }
    if "value" in total:
        metrics["value/mean"] = total["value"] / total["tokens"]
    return metrics


def train_ppo(
    models: PPOModels,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    *,
    seed: int = 0,
    eval_prompts: Sequence[Messages] = (),
    judges: Mapping[str, Scorer] | None = None,
    checkpoints: CheckpointManager | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
    accelerator: Any = None,
) -> PPOTrainResult:
    """Train `policy` (LM + value head, in place) with PPO against a frozen reference.

    Resumes from the newest matching checkpoint in `checkpoints`, if any. `on_log(iteration,
    metrics)` is called after every iteration (1-based), `on_eval(iteration, metrics)` after
    every evaluation on `eval_prompts` (iteration 0 = before training; none without prompts).
    `judges` ({name: scorer}) also score every evaluation's responses (`evaluate_policy`'s
    `<name>_score_mean`); they never shape a reward.
    The reference is put in eval mode with gradients off; the scorer must not need gradients.
    The policy stays in eval mode (no dropout) while it trains.

    With an `accelerate.Accelerator` (run under `accelerate launch`, every process calling
    this with the same models, prompts and settings) the policy and its optimizer are prepared
    by it (DDP over several processes) and each process rolls out its share of the iteration's
    prompts (`rollout_shard`) with the unwrapped policy; advantages are whitened, the KL
    controller fed and the metrics computed over every process's rollout, and the update is
    the single-process update of the whole rollout (`_update`). Only the main process calls
    `on_log` and `on_eval`, shows progress, evaluates and writes checkpoints (every process
    loads them); the result's `eval_history` is the main process's. Every process waits for
    the others before returning, so the caller can save the policy from the main process.
    """
    policy, reference, tokenizer = models.policy, models.reference, models.tokenizer
    if not prompts:
        raise ValueError("There are no prompts to roll out; the prompts set is empty.")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; call ensure_pad_token(tokenizer).")
    world = 1 if accelerator is None else accelerator.num_processes
    is_main = accelerator is None or accelerator.is_main_process
    if settings.prompts_per_iteration < world:
        raise ValueError(
            f"PPO samples {settings.prompts_per_iteration} prompts per iteration but runs on "
            f"{world} processes; raise rollout_batch_size so every process gets a prompt."
        )
    if accelerator is not None and accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            "The accelerator given to train_ppo accumulates gradients itself "
            f"(gradient_accumulation_steps={accelerator.gradient_accumulation_steps}); "
            "create it with the default 1: PPO accumulates over micro_batch_size."
        )
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
    trained = policy  # what the update runs: the policy, or its DDP wrapper
    # Without a critic the value head gets no gradient; DDP waits for a gradient of every
    # trainable parameter, so the head is frozen for the run (its values are never used).
    frozen_head = (
        accelerator is not None
        and settings.uses_groups
        and [p for p in policy.value_head.parameters() if p.requires_grad]
    )
    if frozen_head:
        policy.value_head.requires_grad_(False)
    try:
        if accelerator is not None:
            trained, optimizer = accelerator.prepare(policy, optimizer)
        result = _train(
            models, prompts, settings, trained, optimizer, scheduler, controller, accelerator,
            seed=seed, eval_prompts=eval_prompts, judges=judges, checkpoints=checkpoints,
            on_log=on_log if is_main else None, on_eval=on_eval if is_main else None,
            show_progress=show_progress and is_main,
        )  # fmt: skip
    finally:
        for parameter in frozen_head or []:
            parameter.requires_grad_(True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


def _train(
    models: PPOModels,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    trained: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    controller: AdaptiveKLController | FixedKLController,
    accelerator: Any,
    *,
    seed: int,
    eval_prompts: Sequence[Messages],
    judges: Mapping[str, Scorer] | None,
    checkpoints: CheckpointManager | None,
    on_log: Callable[[int, dict[str, float]], None] | None,
    on_eval: Callable[[int, dict[str, float]], None] | None,
    show_progress: bool,
) -> PPOTrainResult:
    """`train_ppo`'s loop: resume, then iterate, log, evaluate and checkpoint."""
    policy = models.policy
    is_main = accelerator is None or accelerator.is_main_process
    result = PPOTrainResult(iterations=0, resumed_from=0)
    if checkpoints is not None and (latest := checkpoints.latest()) is not None:
        state = checkpoints.load(latest, policy, optimizer, scheduler)
        controller.value = float(state.extra["kl_coef"])
        result = PPOTrainResult(
            iterations=state.global_step,
            resumed_from=state.global_step,
            history=list(state.extra["history"]),
            eval_history=list(state.extra["eval_history"]) if is_main else [],
            train_seconds=float(state.extra["train_seconds"]),
        )
        log.info("resuming PPO from %s (iteration %d)", latest, state.global_step)
        replay_history(result.history, on_log)  # the resumed run's MLflow curves are whole
        replay_history(result.eval_history, on_eval)

    def run_eval(iteration: int) -> None:
        if not eval_prompts or not is_main:
            return
        metrics = evaluate_policy(
            models, eval_prompts, settings, derived_seed(seed, "eval"), judges
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
                models,
                prompts,
                settings,
                controller,
                optimizer,
                scheduler,
                iteration,
                seed,
                trained=trained,
                accelerator=accelerator,
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
                and is_main
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


def rollout_shard(num_prompts: int, group_size: int, rank: int, world: int) -> list[int]:
    """The rows of an iteration's rollout that process `rank` of `world` samples and trains.

    The rollout's rows are its prompt positions, each repeated `group_size` times in a row
    (1 without groups). Prompt positions are dealt out as `distributed.shard` deals examples,
    and a prompt's whole group goes with it, so group baselines never need another process.
    """
    return [
        position * group_size + sample
        for position in shard(range(num_prompts), rank, world)
        for sample in range(group_size)
    ]


def rollout_seed(seed: int, iteration: int, rank: int) -> int:
    """The sampling seed of process `rank`'s rollout in `iteration`.

    Process 0 uses the single-process seed, so one process samples what it always did; the
    others draw independent streams. The union of the samples therefore depends on the number
    of processes: `generate` samples each batch from one random stream, so samples that did
    not depend on it would need one stream, and one generation batch, per prompt."""
    if rank == 0:
        return derived_seed(seed, "rollout", iteration)
    return derived_seed(seed, f"rollout/process-{rank}", iteration)


def _iteration(
    models: PPOModels,
    prompts: Sequence[Messages],
    settings: PPOTrainSettings,
    controller: AdaptiveKLController | FixedKLController,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    iteration: int,
    seed: int,
    *,
    trained: torch.nn.Module | None = None,
    accelerator: Any = None,
) -> dict[str, float]:
    """One rollout + update; returns the iteration's metrics (over every process).

    `trained` is the module the update runs (the DDP-wrapped policy under an accelerator);
    rollouts use `models.policy` itself, so generation makes no collective calls."""
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    started = time.perf_counter()
    indices = iteration_prompt_indices(
        len(prompts), settings.prompts_per_iteration, iteration, seed
    )
    group_size = settings.group_size if settings.uses_groups else 1
    rows = rollout_shard(len(indices), group_size, rank, world)
    prompt_positions = [row // group_size for row in rows[::group_size]]
    kl_coef = controller.value
    experience, timings = make_experience(
        models,
        [prompts[indices[position]] for position in prompt_positions],
        settings,
        kl_coef,
        seed=rollout_seed(seed, iteration, rank),
        reduce_sums=functools.partial(reduce_sums, accelerator) if world > 1 else None,
    )
    metrics = _iteration_metrics(experience, kl_coef, accelerator)
    update_started = time.perf_counter()
    lr = scheduler.get_last_lr()[0]
    generator = torch.Generator().manual_seed(derived_seed(seed, "shuffle", iteration))
    where = f"ppo iteration {iteration + 1} of {settings.iterations}"
    metrics.update(
        update(
            models.policy if trained is None else trained,
            experience,
            settings,
            optimizer,
            scheduler,
            generator,
            where,
            accelerator=accelerator,
            rows=rows,
        )
    )
    finished = time.perf_counter()
    controller.update(metrics["kl/mean"], settings.rollout_batch_size)
    seconds = finished - started
    (tokens,) = reduce_sums(accelerator, [float(experience.attention_mask.sum())])
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
