"""The supervised fine-tuning task for the training loop: completion-only next-token loss.

Each example is a chat-templated prompt + completion + EOS (`tokenize.tokenize_completion`);
only the completion tokens and the EOS are targets. The loop's loss unit is one target token,
so a step's loss is the token mean over every completion token of the step (`logprobs.sft_loss`
semantics), however the step is split into micro-batches.

Packing (optional) concatenates several examples into one row of at most `max_length` tokens.
Each example keeps its own position ids (0, 1, ...) and the model runs without a 2-D attention
mask, from which transformers builds a block-diagonal causal mask (its packed-sequence
format): no token attends across an example boundary, and the first token of an example is
never a target of the previous one. A packed row gives the same per-token log-probabilities
as its examples run one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_core.algorithms.logprobs import shift_for_causal_lm, token_logprobs
from rlhf_core.training.tokenize import Messages, TokenizedCompletion, tokenize_completion


def tokenize_sft_rows(
    tokenizer: Any, prompts: Sequence[Messages], completions: Sequence[str], max_length: int
) -> list[TokenizedCompletion]:
    """`tokenize_completion` for each (prompt, completion) row."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [
        tokenize_completion(tokenizer, prompt, completion, max_length)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (first-fit decreasing).

    Deterministic for given lengths. Every index appears in exactly one row; an example longer
    than `max_length` (not produced by `tokenize_completion`) is an error.
    """
    if any(length > max_length for length in lengths):
        raise ValueError(f"an example is longer than the packing length {max_length}")
    rows: list[list[int]] = []
    free: list[int] = []  # tokens still free in each row
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, space in enumerate(free) if space >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def collate_rows(
    examples: Sequence[TokenizedCompletion], rows: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of rows, each the concatenation of the examples it lists.

    Returns (batch, width) tensors:
      input_ids, attention_mask (1 on real tokens),
      position_ids (restart at 0 for each example; 0 on padding),
      target_mask (1 where the token is a completion token or EOS and not the first token of
      its example: the tokens whose log-probability is in the loss).
    """
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.long)
    for row_index, row in enumerate(rows):
        start = 0
        for example_index in row:
            example = examples[example_index]
            span = slice(start, start + len(example))
            input_ids[row_index, span] = torch.tensor(example.input_ids)
            attention_mask[row_index, span] = 1
            position_ids[row_index, span] = torch.arange(len(example))
            target_mask[row_index, span] = torch.tensor(example.completion_mask)
            target_mask[row_index, start] = 0  # nothing in this example predicts its first token
            start += len(example)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "target_mask": target_mask,
    }


def completion_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool
) -> torch.Tensor:
    """Next-token logits (batch, width, vocab) for a batch from `collate_rows`.

    Unpacked rows use the padding mask. Packed rows pass position ids and *no* attention mask,
    the format in which transformers masks attention block-diagonally per example; the KV
    cache must be off for that detection, so it always is.
    """
    if packed:
        return model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits


class SFTObjective:
    """`TrainingObjective` for completion-only SFT (see the module docstring).

    Units are target tokens; `loss` returns −Σ log p(target) over the micro-batch, i.e.
    `logprobs.sft_loss` × units, and the metric sum `token_accuracy` counts targets that are the
    argmax of their logits. `evaluate` gives the held-out `eval_loss` (token mean) and
    `eval_token_accuracy`, on unpacked examples.
    """

    def __init__(
        self,
        train_examples: Sequence[TokenizedCompletion],
        eval_examples: Sequence[TokenizedCompletion],
        pad_id: int,
        *,
        packing: bool = False,
        max_length: int | None = None,
        eval_batch_size: int = 64,
    ) -> None:
        """`max_length` is the packed row length (required with `packing`)."""
        if not train_examples:
            raise ValueError("no SFT training examples")
        if packing and not max_length:
            raise ValueError("packing needs max_length (the length of a packed row)")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {eval_batch_size}")
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)
        self.pad_id = pad_id
        self.packing = packing
        self.eval_batch_size = eval_batch_size
        example_lengths = [len(e) for e in self.train_examples]
        if packing:
            self.rows = pack_examples(example_lengths, int(max_length))
        else:
            self.rows = [[i] for i in range(len(self.train_examples))]
        # The loop batches these rows: with packing, batch_size counts packed rows.
        self.lengths = [sum(example_lengths[i] for i in row) for row in self.rows]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Tensors for the training rows at `indices`."""
        return collate_rows(self.train_examples, [self.rows[i] for i in indices], self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in the batch."""
        return int(batch["target_mask"].sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(batch["attention_mask"].sum())

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(−Σ log p over target tokens, {"token_accuracy": correct targets})."""
        return self._summed_loss(model, batch, self.packing)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out token-mean loss and token accuracy (empty without eval examples)."""
        if not self.eval_examples:
            return {}
        order = sorted(range(len(self.eval_examples)), key=lambda i: -len(self.eval_examples[i]))
        loss_sum, correct, units = 0.0, 0.0, 0
        for start in range(0, len(order), self.eval_batch_size):
            rows = [[i] for i in order[start : start + self.eval_batch_size]]
            batch = collate_rows(self.eval_examples, rows, self.pad_id)
            batch_loss, metrics = self._summed_loss(model, batch, packed=False)
            loss_sum += float(batch_loss)
            correct += metrics["token_accuracy"]
            units += self.units(batch)
        return {"eval_loss": loss_sum / units, "eval_token_accuracy": correct / units}

    @staticmethod
    def _summed_loss(
        model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = completion_logits(model, batch, packed)  # (batch, width, vocab)
        logits, labels, mask = shift_for_causal_lm(logits, batch["input_ids"], batch["target_mask"])
        logprobs = token_logprobs(logits, labels, mask=mask)  # (batch, width - 1)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == labels) & mask.bool()).sum()
        return -logprobs.sum(), {"token_accuracy": float(correct)}
