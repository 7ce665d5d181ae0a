"""Head to head: how often does the candidate policy beat the champion on held-out prompts?

The quality gate needs this number once a champion exists (`rlhf_core.gate.decide`). Both
policies answer every prompt once, with the same sampling settings and seed; a judge scores
each pair of answers, and the win rate counts ties as half.

The judge is the gold judge when the data has one (the demo task). Without it the candidate's
reward model judges; it was trained beside the candidate's policy, which may flatter that
policy, so a gold judge (or human review) is preferable whenever there is one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_core.data.gold import GoldJudge
from rlhf_core.evaluation.comparison import ResponseJudge
from rlhf_core.evaluation.metrics import bootstrap_ci, win_indicators, win_rate
from rlhf_core.generation import Messages, Rollout, SamplingSettings, generate
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


def head_to_head_win_rate(
    candidate_dir: Path,
    champion_dir: Path,
    prompts: Sequence[Messages],
    sampling: SamplingSettings | None = None,
    seed: int = 0,
    judge: GoldJudge | None = None,
    reward_model_dir: Path | None = None,
) -> dict[str, Any]:
    """Win rate of the candidate over the champion, one sampled answer each per prompt.

    win_rate = (1/N) Σᵢ (1[s(cᵢ) > s(hᵢ)] + ½ · 1[s(cᵢ) = s(hᵢ)]), with cᵢ, hᵢ the candidate's
    and champion's answers to prompt i and s the judge's score (`evaluation.metrics.win_rate`).
    A model against itself with the same seed gives identical answers and exactly ½.

    Args:
        candidate_dir: the candidate policy (a `save_pretrained` directory with tokenizer).
        champion_dir: the champion policy, e.g. from `registry.download_model_dir`.
        prompts: held-out chat prompts, each a list of `{"role", "content"}` messages.
        sampling: how both policies sample; `SamplingSettings()` by default.
        seed: seeds both policies' sampling (the same seed for each) and the bootstrap.
        judge: the gold judge; when None, the reward model at `reward_model_dir` judges.
        reward_model_dir: a `RewardModel.save_pretrained` directory with its tokenizer.

    Returns:
        {"win_rate", "ci_low", "ci_high" (95% percentile bootstrap over prompts),
         "judge": "gold" | "reward_model", "n": number of prompts}.
    """
    if len(prompts) == 0:
        raise ValueError("Head to head needs at least one held-out prompt.")
    if judge is None and reward_model_dir is None:
        raise ValueError("Head to head needs a judge: pass a GoldJudge or reward_model_dir.")
    candidate = _answers(Path(candidate_dir), prompts, sampling, seed)
    champion = _answers(Path(champion_dir), prompts, sampling, seed)
    if judge is not None:
        judge_name = "gold"
        candidate_scores = judge.score_batch(candidate.texts)  # (n,)
        champion_scores = judge.score_batch(champion.texts)  # (n,)
    else:
        judge_name = "reward_model"
        reward_model = RewardModel.from_pretrained(Path(reward_model_dir))
        tokenizer = load_tokenizer(str(reward_model_dir))
        # The evaluation's judge: the one scoring path, unfinished answers penalised.
        rm_judge = ResponseJudge(reward_model, tokenizer, None, batch_size=64)
        candidate_scores = rm_judge.rm_scores(prompts, candidate.texts, candidate.ended)
        champion_scores = rm_judge.rm_scores(prompts, champion.texts, champion.ended)
    interval = bootstrap_ci(win_indicators(candidate_scores, champion_scores), seed=seed)
    result = {
        "win_rate": win_rate(candidate_scores, champion_scores),
        "ci_low": interval.low,
        "ci_high": interval.high,
        "judge": judge_name,
        "n": len(prompts),
    }
    log.info(
        "Candidate vs champion: win rate %.3f [%.3f, %.3f] over %d prompts (%s judge).",
        result["win_rate"],
        interval.low,
        interval.high,
        len(prompts),
        judge_name,
    )
    return result


def _answers(
    model_dir: Path, prompts: Sequence[Messages], sampling: SamplingSettings | None, seed: int
) -> Rollout:
    """One sampled answer per prompt from the policy in `model_dir`, loaded and then freed."""
    if not model_dir.is_dir():
        raise ValueError(f"Policy directory {model_dir} does not exist.")
    model, tokenizer = load_causal_lm(str(model_dir))
    rollout = generate(model, tokenizer, prompts, sampling, seed)
    del model
    gc.collect()  # one policy in memory at a time
    return rollout
