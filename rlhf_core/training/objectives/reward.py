"""The reward-model task for the training loop: Bradley–Terry on pairs, Plackett–Luce on rankings.

A training example is a *comparison group*: the token sequences (chat-templated prompt +
response + EOS, exactly what PPO later scores) of one prompt's responses, best first. A
preference pair is a group of two (chosen, rejected) with an optional margin; a ranking is a
group of K. Every sequence of a micro-batch, chosen and rejected alike, goes through the
reward model in ONE forward pass (concatenated along the batch); the rewards are then
regrouped.

Loss units are *choices*: a pair is one choice (chosen over rejected), a ranking of L
responses is L − 1 choices (best of L, best of the remaining L − 1, ...). Plackett–Luce is a
product of exactly these choices and reduces to Bradley–Terry at L = 2, so with the loop's
"loss sum / units" a mixed step minimises the mean negative log-likelihood per choice of the
whole step's data: one likelihood, every choice weighted alike, whatever the mix of pairs and
rankings in a micro-batch. The training accuracy and margin follow the same units: for a
ranking, each of its L − 1 adjacent pairs (i-th best vs (i+1)-th best) counts once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_core.algorithms.preference import (
    bradley_terry_loss,
    plackett_luce_loss,
    reward_accuracy,
)
from rlhf_core.training.buckets import map_length_buckets
from rlhf_core.training.tokenize import (
    Messages,
    TokenizedCompletion,
    completion_token_ids,
    join_truncated,
    pad_sequences,
    prompt_token_ids,
)


@dataclass(frozen=True)
class ComparisonGroup:
    """Token sequences of one prompt's responses, preferred first.

    `is_ranking` selects the loss: False = a preference pair (Bradley–Terry with `margin`),
    True = a ranking (Plackett–Luce; the margin is unused).
    """

    sequences: tuple[TokenizedCompletion, ...]
    is_ranking: bool = False
    margin: float = 0.0

    def __post_init__(self) -> None:
        if len(self.sequences) < 2:
            raise ValueError("a comparison needs at least two responses")
        if not self.is_ranking and len(self.sequences) != 2:
            raise ValueError("a preference pair has exactly two responses (chosen, rejected)")

    @property
    def choices(self) -> int:
        """Loss units of the group: L − 1 choices for L responses."""
        return len(self.sequences) - 1


def tokenize_group(
    tokenizer: Any,
    prompt: Messages,
    responses: Sequence[str],
    max_length: int,
    *,
    is_ranking: bool = False,
    margin: float = 0.0,
) -> ComparisonGroup:
    """Chat prompt + each response + EOS, truncated like SFT examples (`join_truncated`)."""
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    sequences = tuple(
        join_truncated(prompt_ids, completion_token_ids(tokenizer, response), max_length)
        for response in responses
    )
    return ComparisonGroup(sequences, is_ranking=is_ranking, margin=float(margin))


def collate_groups(groups: Sequence[ComparisonGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch holding every sequence of `groups`, plus how to regroup them.

    Returns:
      input_ids, attention_mask: (sequences, width), all groups' sequences concatenated.
      pair_index: (pairs, 2) rows of (chosen, rejected) sequence positions.
      margin: (pairs,) float.
      ranking_index: (rankings, K) sequence positions best first, padded with 0.
      ranking_lengths: (rankings,) responses per ranking.
    """
    flat: list[TokenizedCompletion] = []
    pair_index, margins, ranking_rows = [], [], []
    for group in groups:
        positions = list(range(len(flat), len(flat) + len(group.sequences)))
        flat.extend(group.sequences)
        if group.is_ranking:
            ranking_rows.append(positions)
        else:
            pair_index.append(positions)
            margins.append(group.margin)
    width = max((len(row) for row in ranking_rows), default=2)
    ranking_index = torch.zeros((len(ranking_rows), width), dtype=torch.long)
    for row, positions in enumerate(ranking_rows):
        ranking_index[row, : len(positions)] = torch.tensor(positions)
    padded = pad_sequences(flat, pad_id, side="right")
    return {
        "input_ids": padded["input_ids"],
        "attention_mask": padded["attention_mask"],
        "pair_index": torch.tensor(pair_index, dtype=torch.long).reshape(-1, 2),
        "margin": torch.tensor(margins, dtype=torch.float32),
        "ranking_index": ranking_index,
        "ranking_lengths": torch.tensor([len(r) for r in ranking_rows], dtype=torch.long),
    }


def group_losses(
    rewards: torch.Tensor, batch: dict[str, torch.Tensor], use_margin: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss and metric sums over the groups of `batch`, from per-sequence `rewards`.

    rewards: (sequences,). Pairs: Σ −log σ(r⁺ − r⁻ − m) (`bradley_terry_loss`; m = 0 unless
    `use_margin`). Rankings: Σ Plackett–Luce NLL (`plackett_luce_loss`). Metric sums, one
    term per choice unit: `accuracy` (pairs in order, r⁺ > r⁻ as in `reward_accuracy`; for
    rankings each adjacent pair) and `margin` (r⁺ − r⁻; for rankings each adjacent gap).
    """
    total = rewards.new_zeros(())
    correct = rewards.new_zeros(())
    margin_sum = rewards.new_zeros(())
    pair_index = batch["pair_index"]
    if len(pair_index):
        chosen, rejected = rewards[pair_index[:, 0]], rewards[pair_index[:, 1]]  # (pairs,)
        margin = batch["margin"].to(rewards) if use_margin else None
        total = total + bradley_terry_loss(chosen, rejected, margin).sum()
        correct = correct + reward_accuracy(chosen, rejected) * len(chosen)
        margin_sum = margin_sum + (chosen - rejected).sum()
    ranking_index = batch["ranking_index"]
    if len(ranking_index):
        lengths = batch["ranking_lengths"]
        scores = rewards[ranking_index]  # (rankings, K), padding slots hold a real reward
        total = total + plackett_luce_loss(scores, lengths).sum()
        slots = torch.arange(scores.shape[1] - 1, device=scores.device)
        adjacent = slots < (lengths - 1).unsqueeze(-1)  # (rankings, K − 1)
        gaps = scores[:, :-1] - scores[:, 1:]  # (rankings, K − 1): s_i − s_{i+1}
        correct = correct + ((gaps > 0) & adjacent).sum()
        margin_sum = margin_sum + (gaps * adjacent).sum()
    return total, {"accuracy": correct.detach(), "margin": margin_sum.detach()}


def reward_batches(groups: Sequence[ComparisonGroup], sequences_per_batch: int) -> list[list[int]]:
    """Group indices in batches of about `sequences_per_batch` sequences, longest first."""
    order = sorted(range(len(groups)), key=lambda i: -max(map(len, groups[i].sequences)))
    batches: list[list[int]] = []
    current: list[int] = []
    count = 0
    for index in order:
        if current and count + len(groups[index].sequences) > sequences_per_batch:
            batches.append(current)
            current, count = [], 0
        current.append(index)
        count += len(groups[index].sequences)
    if current:
        batches.append(current)
    return batches


class RewardObjective:
    """`TrainingObjective` for a reward model on pairs and rankings (see the module docstring).

    `loss` returns the summed Bradley–Terry / Plackett–Luce loss of a micro-batch and the
    metric sums `accuracy` and `margin`; `evaluate` scores the held-out groups and returns
    `eval_loss` (per choice), `eval_accuracy` and `eval_margin_mean` over held-out pairs, and
    `eval_ranking_accuracy` / `eval_ranking_loss` when there are held-out rankings.
    """

    def __init__(
        self,
        train_groups: Sequence[ComparisonGroup],
        eval_groups: Sequence[ComparisonGroup],
        pad_id: int,
        *,
        use_margin: bool = False,
        eval_batch_size: int = 64,
    ) -> None:
        if not train_groups:
            raise ValueError("no reward-model training comparisons")
        if eval_batch_size < 2:
            raise ValueError(f"eval_batch_size must be at least 2, got {eval_batch_size}")
        self.train_groups = list(train_groups)
        self.eval_groups = list(eval_groups)
        self.pad_id = pad_id
        self.use_margin = use_margin
        self.eval_batch_size = eval_batch_size
        # Padded tokens a group costs: its sequences × its longest one.
        self.lengths = [len(g.sequences) * max(map(len, g.sequences)) for g in self.train_groups]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Tensors for the training groups at `indices`."""
        return collate_groups([self.train_groups[i] for i in indices], self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Choices in the batch: one per pair, L − 1 per ranking of L."""
        return len(batch["pair_index"]) + int((batch["ranking_lengths"] - 1).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(batch["attention_mask"].sum())

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the batch's choices, metric sums `accuracy`, `margin`)."""
        total, sums = self._summed_loss(model, batch)
        return total, {name: float(value) for name, value in sums.items()}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (see the class docstring); empty without held-out groups."""
        pairs = [g for g in self.eval_groups if not g.is_ranking]
        rankings = [g for g in self.eval_groups if g.is_ranking]
        metrics: dict[str, float] = {}
        if pairs:
            loss, sums, units = self._score_groups(model, pairs)
            metrics["eval_loss"] = loss / units
            metrics["eval_accuracy"] = sums["accuracy"] / units
            metrics["eval_margin_mean"] = sums["margin"] / units
        if rankings:
            loss, sums, units = self._score_groups(model, rankings)
            metrics["eval_ranking_loss"] = loss / len(rankings)  # per ranking, as PL's NLL
            metrics["eval_ranking_accuracy"] = sums["accuracy"] / units
        return metrics

    def _score_groups(
        self, model: torch.nn.Module, groups: list[ComparisonGroup]
    ) -> tuple[float, dict[str, float], int]:
        loss_sum, sums, units = 0.0, {"accuracy": 0.0, "margin": 0.0}, 0
        for indices in reward_batches(groups, self.eval_batch_size):
            batch = collate_groups([groups[i] for i in indices], self.pad_id)
            total, batch_sums = self._summed_loss(model, batch)
            loss_sum += float(total)
            for name, value in batch_sums.items():
                sums[name] += float(value)
            units += self.units(batch)
        return loss_sum, sums, units

    def _summed_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        rewards = map_length_buckets(  # every sequence, in length buckets (little padding)
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            lambda part: model(part["input_ids"], part["attention_mask"]),
        )  # (sequences,)
        return group_losses(rewards, batch, self.use_margin)
