"""Reward-model scores of responses: the one scoring path of every stage.

The reward model is trained on the chat-rendered prompt with the assistant generation prompt,
the response's tokens and the EOS (`training.tokenize`), and reads its score at the last real
token. PPO (`score_token_ids` on the sampled ids), best-of-n, the evaluation, the gate's
head-to-head and the served `rlhf-reward` model (`score`) all feed it exactly those ids.

A reward stage that trained an ensemble (`reward.ensemble.members` > 1) leaves member 0 at the
reward model's directory, the others under `members/<i>/` in it and the list of all of them in
`ensemble.json` (`write_ensemble_manifest`); `load_reward_members` reads them back and
`score_members` / `score_token_ids_members` give each member's scores, (members, n), for
`algorithms.ensemble.conservative_reward` to aggregate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

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
    sequences, pad_id = response_token_ids(tokenizer, prompts, responses, ended)
    return score_token_ids(reward_model, sequences, pad_id, batch_size)


def response_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
) -> tuple[list[list[int]], int]:
    """(the token ids `score` feeds the reward model for each pair, the pad id)."""
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
    return sequences, pad_id


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


# --------------------------------------------------------------------------------------------
# Reward-model ensembles
# --------------------------------------------------------------------------------------------

ENSEMBLE_MANIFEST = "ensemble.json"
ENSEMBLE_FORMAT = "rlhf_core.reward_ensemble"
MEMBERS_DIR = "members"


def member_dir(reward_dir: str | os.PathLike, index: int) -> Path:
    """Where member `index` lives: member 0 is the reward model itself (everything that loads
    one reward model loads it), member i ≥ 1 is `members/<i>/` inside it."""
    reward_dir = Path(reward_dir)
    return reward_dir if index == 0 else reward_dir / MEMBERS_DIR / str(index)


def write_ensemble_manifest(
    reward_dir: str | os.PathLike, seeds: Sequence[int], bootstrap: bool
) -> Path:
    """Write `ensemble.json` listing every member (path relative to `reward_dir`, seed, and
    whether it trained on a bootstrap resample; member 0 never does). Written after the
    members, so a manifest names only members that are whole."""
    from rlhf_core.files import write_json

    reward_dir = Path(reward_dir)
    members = [
        {
            "index": index,
            "path": member_dir(reward_dir, index).relative_to(reward_dir).as_posix(),
            "seed": int(seed),
            "bootstrap": bool(bootstrap and index > 0),
        }
        for index, seed in enumerate(seeds)
    ]
    manifest = {"format": ENSEMBLE_FORMAT, "members": members}
    return write_json(reward_dir / ENSEMBLE_MANIFEST, manifest, what="the reward ensemble manifest")


def reward_member_dirs(reward_dir: str | os.PathLike) -> list[Path]:
    """The directories of the reward model's ensemble members, member 0 (`reward_dir`) first;
    just `[reward_dir]` when the stage trained one model (no `ensemble.json`)."""
    reward_dir = Path(reward_dir)
    manifest_path = reward_dir / ENSEMBLE_MANIFEST
    if not manifest_path.is_file():
        return [reward_dir]
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != ENSEMBLE_FORMAT or not manifest.get("members"):
        raise ValueError(
            f"{manifest_path} is not a reward ensemble manifest; rerun `rlhf stage reward`."
        )
    directories = [reward_dir / member["path"] for member in manifest["members"]]
    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{manifest_path} lists members that are missing ({', '.join(missing)}); "
            "rerun `rlhf stage reward`."
        )
    return directories


def load_reward_members(
    reward_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> list[RewardModel]:
    """Every member of the reward ensemble at `reward_dir` (one model without a manifest), in
    eval mode, member 0 first."""
    return [
        RewardModel.from_pretrained(directory, dtype=dtype).eval()
        for directory in reward_member_dirs(reward_dir)
    ]


JUDGE_DIR = "judge"


def judge_dir(reward_dir: str | os.PathLike) -> Path:
    """Where the reward stage keeps its held-out judge (`reward.judge`): `judge/` inside the
    reward model's directory, beside the ensemble members."""
    return Path(reward_dir) / JUDGE_DIR


def has_judge(reward_dir: str | os.PathLike) -> bool:
    """Whether the reward stage trained a held-out judge (a saved model in `judge_dir`)."""
    return (judge_dir(reward_dir) / "config.json").is_file()


def load_judge(
    reward_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> RewardModel | None:
    """The held-out judge the reward stage trained (in eval mode), None when it trained none."""
    if not has_judge(reward_dir):
        return None
    return RewardModel.from_pretrained(judge_dir(reward_dir), dtype=dtype).eval()


def score_token_ids_members(
    members: Sequence[RewardModel],
    input_ids_list: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Each member's reward of each sequence, (members, n) float32 (`score_token_ids` per
    member: k members cost k forward passes per sequence)."""
    if not members:
        raise ValueError("No reward models to score with; pass at least one member.")
    return torch.stack(
        [score_token_ids(member, input_ids_list, pad_id, batch_size) for member in members]
    )


def score_members(
    members: Sequence[RewardModel],
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    batch_size: int = 64,
    ended: Sequence[bool] | None = None,
) -> torch.Tensor:
    """`score` by each member, (members, n) float32; the pairs are tokenised once."""
    sequences, pad_id = response_token_ids(tokenizer, prompts, responses, ended)
    return score_token_ids_members(members, sequences, pad_id, batch_size)
