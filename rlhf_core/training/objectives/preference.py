"""Direct preference optimisation as a `TrainingObjective`: pairs, one forward, cached reference.

A preference pair (prompt x, chosen y⁺, rejected y⁻) becomes two token sequences that share
the prompt, tokenised once. A micro-batch of b pairs is ONE forward pass over 2b rows,
`[chosen_0 … chosen_{b-1}, rejected_0 … rejected_{b-1}]`, right-padded. The reference
model's sequence log-probabilities are computed once before training (`reference_logps`) and
looked up by pair index, so a training step never runs a second model.

The loss of each pair is the callable the `policy.dpo` settings build
(`DPOSettings.pair_loss`: `algorithms.preference.reference_pair_loss` for sigmoid / IPO /
hinge, `simpo_pair_loss` for SimPO, each with the optional RPO term).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf_core.algorithms.logprobs import shift_for_causal_lm, token_logprobs
from rlhf_core.algorithms.preference import PairLoss
from rlhf_core.training.buckets import map_length_buckets
from rlhf_core.training.tokenize import (
    TokenizedCompletion,
    completion_token_ids,
    join_truncated,
    pad_sequences,
    prompt_token_ids,
)

METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll/chosen",
)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairOutputs:
    """Per-pair results of the objective, each (pairs,); everything but `losses` detached."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor  # the log-probs that enter the loss (sums, or means if averaged)
    rejected_logps: Tensor
    chosen_nll: Tensor  # token-mean NLL of y⁺

    def metric_sums(self) -> dict[str, float]:
        """Sums over pairs of each metric in `METRIC_NAMES` (the loop divides by pairs)."""
        margins = self.chosen_rewards - self.rejected_rewards
        values = (
            self.chosen_rewards,
            self.rejected_rewards,
            margins,
            (margins > 0).float(),  # ties count as wrong, as in `preference.reward_accuracy`
            self.chosen_logps,
            self.rejected_logps,
            self.chosen_nll,
        )
        return {name: float(value.sum()) for name, value in zip(METRIC_NAMES, values, strict=True)}


PairLossFunction = Callable[[Tensor, Tensor, Tensor | None], PairLoss]


def preference_outputs(
    pair_loss: PairLossFunction,
    logp_sums: Tensor,
    token_counts: Tensor,
    reference_sums: Tensor | None,
) -> PairOutputs:
    """Per-pair loss and metrics from summed sequence log-probabilities.

    Args:
        pair_loss: the run's loss, built by `DPOSettings.pair_loss` (a
            `algorithms.preference.reference_pair_loss` or `simpo_pair_loss` with its knobs).
        logp_sums: (2, pairs) summed completion log-probs under the policy, row 0 chosen.
        token_counts: (2, pairs) completion token counts, same layout.
        reference_sums: (2, pairs) summed reference log-probs, or None for SimPO.
    """
    result = pair_loss(logp_sums, token_counts, reference_sums)
    chosen_nll = -logp_sums[0] / token_counts[0].to(logp_sums.dtype)  # (pairs,)
    return PairOutputs(
        losses=result.losses,
        chosen_rewards=result.chosen_rewards,
        rejected_rewards=result.rejected_rewards,
        chosen_logps=result.chosen_scores,
        rejected_logps=result.rejected_scores,
        chosen_nll=chosen_nll.detach(),
    )


# --------------------------------------------------------------------------------------------
# Pairs: tokenise, collate, score
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    """Prompt + chosen and prompt + rejected token sequences of one preference pair."""

    chosen: TokenizedCompletion
    rejected: TokenizedCompletion

    @property
    def tokens(self) -> int:
        """Real tokens the pair puts through a forward pass."""
        return len(self.chosen) + len(self.rejected)

    @property
    def padded_tokens(self) -> int:
        """Tokens of the pair's two rows padded to the longer one (its share of a batch)."""
        return 2 * max(len(self.chosen), len(self.rejected))


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    chosen: Sequence[str],
    rejected: Sequence[str],
    max_length: int,
) -> list[TokenizedPair]:
    """Chat-template each prompt once and join it with both responses (+ EOS), truncated.

    Truncation follows `join_truncated` (prompt start first, then the response end), for each
    response separately.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError("prompts, chosen and rejected must have one entry per pair.")
    pairs = []
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        prompt_ids = prompt_token_ids(tokenizer, prompt)
        pairs.append(
            TokenizedPair(
                chosen=join_truncated(
                    prompt_ids, completion_token_ids(tokenizer, good), max_length
                ),
                rejected=join_truncated(
                    prompt_ids, completion_token_ids(tokenizer, bad), max_length
                ),
            )
        )
    return pairs


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, Tensor]:
    """One right-padded batch of 2b rows: chosen rows first, then rejected rows in pair order.

    Returns `input_ids`, `attention_mask`, `completion_mask`, each (2b, width).
    """
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs.")
    rows = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    return pad_sequences(rows, pad_id, side="right")


def completion_logp_sums(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and token counts, each (2, pairs).

    s_i = Σₜ m_{i,t} log π(x_{i,t+1} | x_{i,≤t}) with m the completion mask (EOS included).
    Chosen and rejected rows go through the model together, in length buckets
    (`buckets.map_length_buckets`: one forward pass per bucket, little padding).
    """
    device = next(model.parameters()).device
    tensors = {
        name: batch[name].to(device) for name in ("input_ids", "attention_mask", "completion_mask")
    }

    def logp_sums(part: dict[str, Tensor]) -> Tensor:
        logits = model(
            input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False
        ).logits
        logits, labels, mask = shift_for_causal_lm(
            logits, part["input_ids"], part["completion_mask"]
        )  # (rows, seq-1, vocab), (rows, seq-1), (rows, seq-1)
        return token_logprobs(logits, labels, mask=mask).sum(-1)  # (rows,)

    sums = map_length_buckets(tensors, logp_sums)  # (2b,)
    counts = tensors["completion_mask"][:, 1:].sum(-1)  # targets: positions 1.. (2b,)
    return sums.view(2, -1), counts.view(2, -1)


def length_sorted_batches(sizes: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices sorted by size (longest first) in chunks of `batch_size`: little padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def reference_logps(
    reference_model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    batch_size: int = 64,
    show_progress: bool = False,
) -> Tensor:
    """Summed completion log-probs of every pair under the frozen reference, (pairs, 2) float32.

    Column 0 is the chosen response, column 1 the rejected one, in the order of `pairs`. Runs
    once before training: in inference mode, eval mode (restored afterwards), in length-sorted
    batches of `batch_size` pairs.
    """
    from rich.progress import track

    result = torch.empty(len(pairs), 2, dtype=torch.float32)
    was_training = reference_model.training
    reference_model.eval()
    batches = list(length_sorted_batches([p.padded_tokens for p in pairs], batch_size))
    try:
        with torch.inference_mode():
            for indices in track(
                batches, description="reference log-probs", disable=not show_progress
            ):
                sums, _ = completion_logp_sums(
                    reference_model, collate_pairs([pairs[i] for i in indices], pad_id)
                )
                result[indices] = sums.T.float().cpu()
    finally:
        reference_model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------
# The training task
# --------------------------------------------------------------------------------------------


class PreferenceObjective:
    """`TrainingObjective` for DPO-family losses: units are pairs, one forward per micro-batch.

    `lengths` are each pair's padded tokens (2 × its longer row), so the loop's
    `max_tokens_per_micro_batch` budget counts the real width of the 2b-row forward pass.
    """

    def __init__(
        self,
        pair_loss: PairLossFunction,
        train_pairs: Sequence[TokenizedPair],
        pad_id: int,
        *,
        train_reference: Tensor | None = None,
        eval_pairs: Sequence[TokenizedPair] = (),
        eval_reference: Tensor | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        """`pair_loss`: from `DPOSettings.pair_loss`. `train_reference` / `eval_reference`:
        (pairs, 2) from `reference_logps`, for every loss but SimPO."""
        for name, pairs, cached in (
            ("train", train_pairs, train_reference),
            ("eval", eval_pairs, eval_reference),
        ):
            if cached is not None and tuple(cached.shape) != (len(pairs), 2):
                raise ValueError(
                    f"{name}_reference must have shape ({len(pairs)}, 2) (from reference_logps), "
                    f"not {tuple(cached.shape)}."
                )
        self.pair_loss = pair_loss
        self.pairs = list(train_pairs)
        self.pad_id = pad_id
        self.reference = train_reference
        self.eval_pairs = list(eval_pairs)
        self.eval_reference = eval_reference
        self.eval_batch_size = eval_batch_size
        self.lengths = [pair.padded_tokens for pair in self.pairs]

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Padded 2b-row batch of the pairs at `indices`, plus their cached reference sums."""
        return self._collate(self.pairs, self.reference, indices)

    def _collate(self, pairs, reference, indices: list[int]) -> dict[str, Any]:
        batch: dict[str, Any] = collate_pairs([pairs[i] for i in indices], self.pad_id)
        # (2, b) like the policy's sums: row 0 chosen, row 1 rejected
        batch["reference_sums"] = None if reference is None else reference[indices].T
        return batch

    def units(self, batch: dict[str, Any]) -> int:
        """Pairs in the batch."""
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch: dict[str, Any]) -> int:
        """Real tokens of the batch's one forward pass."""
        return int(batch["attention_mask"].sum())

    def outputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> PairOutputs:
        """Per-pair loss and metrics of a collated batch (one forward pass of `model`)."""
        sums, counts = completion_logp_sums(model, batch)
        return preference_outputs(self.pair_loss, sums, counts, batch["reference_sums"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict]:
        """Sum of per-pair losses and metric sums over the batch's pairs."""
        outputs = self.outputs(model, batch)
        return outputs.losses.sum(), outputs.metric_sums()

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss and metrics over the held-out pairs (empty when there are none)."""
        if not self.eval_pairs:
            return {}
        totals: dict[str, float] = {}
        sizes = [pair.padded_tokens for pair in self.eval_pairs]
        for indices in length_sorted_batches(sizes, self.eval_batch_size):
            batch = self._collate(self.eval_pairs, self.eval_reference, indices)
            outputs = self.outputs(model, batch)
            sums = {"loss": float(outputs.losses.sum()), **outputs.metric_sums()}
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
        return {name: value / len(self.eval_pairs) for name, value in totals.items()}
