"""Chat-formatted token sequences for training: prompt + completion + EOS, with a loss mask.

The prompt is rendered by the tokenizer's chat template with the assistant generation prompt;
the completion follows, then the tokenizer's EOS token. The completion mask is 1 on the
completion tokens *and the EOS*: the EOS is always in the loss, also when a tokenizer uses
its EOS as padding (masking "everything equal to pad" would drop it, which is the most common
reason a fine-tuned model never stops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

Messages = Sequence[dict[str, str]]


@dataclass(frozen=True)
class TokenizedCompletion:
    """One prompt + completion sequence.

    `completion_mask[t]` is 1 when token t is a completion token (its log-prob is in the
    loss); the prompt tokens are 0. `prompt_length` counts the prompt tokens kept. `end_cut`
    says the sequence lost the end of its completion, EOS included, to `max_length`: such an
    example teaches a model not to stop.
    """

    input_ids: list[int]
    completion_mask: list[int]
    prompt_length: int
    end_cut: bool = False  # truncation removed the end of the completion, EOS included

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_token_ids(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of the chat-rendered prompt ending with the assistant generation prompt."""
    if not prompt:
        return []
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def completion_token_ids(tokenizer: Any, completion: str) -> list[int]:
    """Token ids of a completion followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set one so completions can end")
    return [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]


def join_truncated(
    prompt_ids: list[int], completion_ids: list[int], max_length: int
) -> TokenizedCompletion:
    """Concatenate prompt and completion within `max_length` tokens.

    Over-long sequences lose the *start* of the prompt first (the end of a prompt matters most
    for the answer), down to half the budget; then the end of the completion.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    overflow = len(prompt_ids) + len(completion_ids) - max_length
    full_completion = len(completion_ids)
    if overflow > 0:
        keep_prompt = max(len(prompt_ids) - overflow, min(len(prompt_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return TokenizedCompletion(
        input_ids=prompt_ids + completion_ids,
        completion_mask=[0] * len(prompt_ids) + [1] * len(completion_ids),
        prompt_length=len(prompt_ids),
        end_cut=len(completion_ids) < full_completion,
    )


def tokenize_completion(
    tokenizer: Any, prompt: Messages, completion: str, max_length: int
) -> TokenizedCompletion:
    """Prompt (chat template) + completion + EOS, truncated to `max_length`."""
    return join_truncated(
        prompt_token_ids(tokenizer, prompt), completion_token_ids(tokenizer, completion), max_length
    )


def pad_sequences(
    sequences: Sequence[TokenizedCompletion], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Batch tensors: `input_ids`, `attention_mask` and `completion_mask`, all (batch, width).

    Padding positions have attention 0 and completion mask 0, whatever the pad id is.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        input_ids[row, span] = torch.tensor(sequence.input_ids)
        attention[row, span] = 1
        completion[row, span] = torch.tensor(sequence.completion_mask)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
