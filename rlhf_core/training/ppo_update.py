"""The PPO update: `ppo_epochs` passes over shuffled minibatches of one iteration's experience.

Clipped policy loss + `vf_coef` · clipped value loss − `entropy_coef` · entropy (Schulman et al.
2017, arXiv:1707.06347; the RLHF form of Ouyang et al. 2022, arXiv:2203.02155), gradient
accumulation over micro-batches normalised by the minibatch's response tokens, clipping, step.
On several processes each minibatch is the same global draw of rows, every process trains its
own rows of it with the loss normalised by the minibatch's tokens over all processes, under
DDP (`ppo_trainer.train_ppo` prepares the policy), so the update equals one process's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_core.algorithms.logprobs import token_entropy
from rlhf_core.algorithms.ppo import masked_mean, ppo_policy_loss, ppo_value_loss
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.training.distributed import reduce_named_sums, reduce_sums
from rlhf_core.training.divergence import describe_examples, require_finite
from rlhf_core.training.rollout import Experience, forward_token_stats


def _micro_batch_loss(
    policy: PolicyWithValueHead,
    experience: Experience,
    rows: torch.Tensor,
    settings: PPOTrainSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Token-mean loss of one micro-batch, its detached stats and its response-token count."""
    mask = experience.mask[rows]
    logps, values, logits, _ = forward_token_stats(
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


def update(
    policy: PolicyWithValueHead,
    experience: Experience,
    settings: PPOTrainSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    where: str = "ppo update",
    *,
    accelerator: Any = None,
    rows: Sequence[int] | None = None,
) -> dict[str, float]:
    """`ppo_epochs` passes of minibatch updates; returns token-weighted means of the stats.
    A NaN or infinite loss or gradient norm raises TrainingDivergedError before the optimizer
    step (`where` names the iteration in its message).

    With an `accelerator`, `policy` is the model it prepared (DDP over several processes),
    `experience` this process's rows and `rows` their positions in the iteration's whole
    rollout (default: all of it). Every process draws the same shuffle of the whole rollout
    and trains on its own rows of each minibatch; each loss is weighted by the minibatch's
    response tokens over every process, so the averaged gradient is the one a single process
    computes on the whole minibatch. Every process runs the same number of forward/backward
    passes per minibatch (the most any process needs; a process with fewer rows, or none,
    adds passes of weight zero), since DDP communicates in both, and only the last one
    synchronises gradients. A non-finite loss on any process stops every process.
    """
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    trainable = [p for p in policy.parameters() if p.requires_grad]
    rows = list(range(experience.input_ids.shape[0])) if rows is None else list(rows)
    local_of = {row: local for local, row in enumerate(rows)}  # rollout row -> this shard's
    n = int(reduce_sums(accelerator, [len(rows)])[0])  # rows of the whole rollout
    micro = settings.micro_batch_size_or_minibatch
    totals: dict[str, float] = {}
    total_tokens, grad_norms = 0, []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.minibatch_size):
            minibatch = order[start : start + settings.minibatch_size]
            mine = [local_of[row] for row in minibatch.tolist() if row in local_of]
            micro_batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
            passes = [0.0] * world
            passes[rank] = float(len(micro_batches))
            minibatch_tokens, *passes = reduce_sums(
                accelerator, [float(experience.mask[mine].sum()), *passes]
            )
            micro_batches += [[]] * (int(max(passes)) - len(micro_batches))
            first_bad: tuple[float, list[int]] | None = None  # (loss, rollout rows)
            for index, local in enumerate(micro_batches):
                # A padding pass (no rows here) runs this shard's first row with weight zero.
                batch_rows = torch.tensor(
                    local or [0], dtype=torch.long, device=experience.mask.device
                )
                no_sync = world > 1 and index < len(micro_batches) - 1
                with accelerator.no_sync(policy) if no_sync else contextlib.nullcontext():
                    loss, stats, tokens = _micro_batch_loss(
                        policy, experience, batch_rows, settings
                    )
                    tokens = tokens if local else 0
                    loss_value = float(loss.detach())
                    if local and first_bad is None and not math.isfinite(loss_value):
                        first_bad = (loss_value, [rows[i] for i in local])
                    # Weighting each micro-batch's token mean by its share of the minibatch's
                    # tokens makes the accumulated gradient the minibatch's exact token mean;
                    # DDP averages over processes, hence the factor `world`.
                    weighted = loss * (tokens * world / minibatch_tokens)
                    if accelerator is None:
                        weighted.backward()
                    else:
                        accelerator.backward(weighted)
                if local:
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * tokens
                    total_tokens += tokens
            _require_finite_losses(accelerator, first_bad, where)
            grad_norms.append(_clip_gradients(trainable, settings.max_grad_norm, accelerator))
            require_finite(
                "gradient norm",
                grad_norms[-1],
                _naming(where, minibatch),
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    summed = reduce_named_sums(accelerator, {**totals, _TOKENS: float(total_tokens)})
    metrics = {key: summed[key] / summed[_TOKENS] for key in totals}
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics


_TOKENS = "_tokens"  # the name of the token count among the reduced stat sums


def _require_finite_losses(
    accelerator: Any, first_bad: tuple[float, list[int]] | None, where: str
) -> None:
    """Raise TrainingDivergedError on every process when any process saw a non-finite loss.

    The check comes after the minibatch's backward passes, which every process must join; the
    process that saw the loss names its rollout rows, the others say it was another's."""
    if accelerator is None or accelerator.num_processes == 1:
        if first_bad is not None:
            require_finite("loss", first_bad[0], _naming(where, torch.tensor(first_bad[1])))
        return
    bad_nan = first_bad is not None and math.isnan(first_bad[0])
    bad_inf = first_bad is not None and not bad_nan
    nans, infs = reduce_sums(accelerator, [float(bad_nan), float(bad_inf)])
    if first_bad is not None:
        require_finite("loss", first_bad[0], _naming(where, torch.tensor(first_bad[1])))
    if nans or infs:
        value = float("nan") if nans else float("inf")
        require_finite("loss", value, lambda: f"{where} (rollout rows of another process)")


def _naming(where: str, rows: torch.Tensor) -> Callable[[], str]:
    """The failure message's place: the iteration and the rollout rows."""
    return lambda: f"{where} ({describe_examples(rows.tolist(), 'rollout rows')})"


def _clip_gradients(
    parameters: list[torch.nn.Parameter], max_norm: float, accelerator: Any = None
) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping); return the norm before.

    With an accelerator its `clip_grad_norm_` (it unscales mixed-precision gradients first);
    under DDP the gradients are already averaged, so every process gets the same norm."""
    if max_norm > 0 and accelerator is not None:
        return float(accelerator.clip_grad_norm_(parameters, max_norm))
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    if accelerator is not None:
        accelerator.unscale_gradients()
    grads = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
