"""Reward-model scores of responses: the one scoring path of every stage.

The reward model is trained on the chat-rendered prompt with the assistant generation prompt,
the response's tokens and the EOS (`training.tokenize`), and reads its score at the last real
token. PPO (`score_token_ids` on the sampled ids), best-of-n, the evaluation, the gate's
head-to-head and the served `rlhf-reward` model (`score`) all feed it exactly those ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_core.config.training import require_batch_size
from rlhf_core.generation import (
    Messages,
    device_of,
    eval_mode,
    length_sorted_batches,
    pad_and_eos_ids,
    pad_batch,
    require_chat_template,
)
from rlhf_core.models.heads import RewardModel
from rlhf_core.training.tokenize import prompt_token_ids


def score(
    reward_model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    batch_size: int = 64,
    ended: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Reward r(x, y) for each (prompt, response) pair, as float32 (n,) in the given order.

    Scored on exactly the token ids the reward model was trained on (`training.tokenize`):
    the chat-rendered prompt with the assistant generation prompt, the response's tokens, and
    the tokenizer's EOS when the response ended. `ended` says which responses ended (sampled
    ones that hit the length limit did not); None means all did, as for preference data. A
    re-rendered full chat template would add what follows the EOS (ChatML's newline) and move
    the scored position off the token the model was trained to read.
    """
    if len(prompts) != len(responses) or (ended is not None and len(ended) != len(responses)):
        raise ValueError(
            f"score needs one response per prompt (and one ended flag per response) but got "
            f"{len(prompts)} prompts and {len(responses)} responses."
        )
    require_chat_template(tokenizer)
    pad_id, eos_id = pad_and_eos_ids(tokenizer)
    ended = [True] * len(responses) if ended is None else list(ended)
    sequences = [
        prompt_token_ids(tokenizer, prompt)
        + tokenizer.encode(response, add_special_tokens=False)
        + ([eos_id] if finished else [])
        for prompt, response, finished in zip(prompts, responses, ended, strict=True)
    ]
    return score_token_ids(reward_model, sequences, pad_id, batch_size)


def score_token_ids(
    reward_model: RewardModel,
    input_ids_list: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Reward of each already-tokenised sequence, as float32 (n,) in the given order.

    Sequences are sorted by length, right-padded with `pad_id` in batches of `batch_size` and
    scored in inference mode with the reward model in eval mode. PPO passes
    `prompt_ids + response_ids` of its rollouts, so the reward model sees exactly the sampled
    tokens.
    """
    require_batch_size(batch_size)
    sequences = [[int(token) for token in ids] for ids in input_ids_list]
    empty = [i for i, ids in enumerate(sequences) if not ids]
    if empty:
        raise ValueError(f"Sequences {empty} are empty; a reward model needs at least one token.")
    scores = torch.empty(len(sequences), dtype=torch.float32)
    device = device_of(reward_model)
    with eval_mode(reward_model), torch.inference_mode():
        for batch in length_sorted_batches([len(ids) for ids in sequences], batch_size):
            input_ids, attention_mask = pad_batch([sequences[i] for i in batch], pad_id, "right")
            rewards = reward_model(input_ids.to(device), attention_mask.to(device))  # (batch,)
            scores[batch] = rewards.float().cpu()
    return scores
