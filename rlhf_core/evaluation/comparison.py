"""Held-out comparison of policies: every policy answers the same prompts with the same
sampling settings; each response is scored by the reward model and (on the demo task) the gold
judge; best-of-n keeps the reward model's favourite of n SFT samples (its KL is the analytic
log n − (n − 1)/n, Gao et al. 2023, arXiv:2210.10760); the reward model is checked on the
held-out preference pairs."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_core.evaluation.metrics import (
    best_of_n_kl,
    best_of_n_select,
    kl_from_logprob_sums,
    summarise_policy,
)
from rlhf_core.generation import SamplingSettings

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_core.data.gold import GoldJudge
    from rlhf_core.generation import Messages, Rollout
    from rlhf_core.models.heads import RewardModel

log = logging.getLogger(__name__)

SFT = "sft"  # the reference policy's name in every result
REWARD_MODEL = "reward_model"  # the key of the reward model's block in evaluate.json
BEST_OF_N_PREFIX = "bon_"


# --------------------------------------------------------------------------------------------
# Responses and their scores
# --------------------------------------------------------------------------------------------


@dataclass
class PolicyResponses:
    """One policy's responses to the evaluation items (prompt-major: prompt i's samples are
    rows i·s … i·s + s − 1) and their scores."""

    texts: list[str]
    ended: list[bool]
    rm_scores: np.ndarray  # (items,) reward-model scores
    gold_scores: np.ndarray | None  # (items,) gold-judge scores; None without a gold judge
    kl_to_sft: float
    kl_to_sft_stderr: float | None = None  # standard error of a Monte-Carlo KL estimate


class ResponseJudge:
    """Scores responses with the reward model and, when there is one, the gold judge.

    Sampled responses that never ended are scored as unfinished (`penalise_unfinished` with
    `missing_eos_penalty` and `unfinished_score`, as PPO does), so neither best-of-n nor a win
    rate can favour a response cut off by the length limit.

    With a reward ensemble (`members`: every member, `reward_model` first) each member scores
    every response; the reported reward-model score is the members' mean, and best-of-n picks
    by `best_of_n_aggregate` (`algorithms.ensemble.conservative_reward`; Coste et al. 2023).
    """

    def __init__(
        self,
        reward_model: RewardModel,
        tokenizer: PreTrainedTokenizerBase,
        gold_judge: GoldJudge | None,
        batch_size: int,
        missing_eos_penalty: float = 1.0,
        unfinished_score: float | None = None,
        *,
        members: Sequence[RewardModel] | None = None,
        best_of_n_aggregate: str = "mean",
        best_of_n_std_coef: float = 1.0,
    ) -> None:
        self.reward_model = reward_model
        self.members = list(members) if members else [reward_model]
        self.best_of_n_aggregate = best_of_n_aggregate
        self.best_of_n_std_coef = best_of_n_std_coef
        self.tokenizer = tokenizer
        self.gold_judge = gold_judge
        self.batch_size = batch_size
        self.missing_eos_penalty = missing_eos_penalty
        self.unfinished_score = unfinished_score

    def rm_scores(
        self,
        prompts: Sequence[Messages],
        texts: Sequence[str],
        ended: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """(items,) float64 reward-model scores of `texts` as answers to `prompts`; `ended`
        flags sampled responses (None: every text is a finished answer). With an ensemble,
        the members' mean."""
        import torch

        from rlhf_core.algorithms.ppo import penalise_unfinished
        from rlhf_core.scoring import score

        if len(self.members) > 1:
            return self.member_rm_scores(prompts, texts, ended).mean(axis=0)
        rewards = score(
            self.reward_model, self.tokenizer, prompts, texts, self.batch_size, ended=ended
        )
        if ended is not None:
            rewards = penalise_unfinished(
                rewards,
                torch.tensor(list(ended), dtype=torch.bool),
                self.missing_eos_penalty,
                self.unfinished_score,
            )
        return rewards.double().numpy()

    def member_rm_scores(
        self,
        prompts: Sequence[Messages],
        texts: Sequence[str],
        ended: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """(members, items) float64 scores of each ensemble member, unfinished responses
        penalised as in `rm_scores`; one row without an ensemble."""
        import torch

        from rlhf_core.algorithms.ppo import penalise_unfinished
        from rlhf_core.scoring import score_members

        rewards = score_members(
            self.members, self.tokenizer, prompts, texts, self.batch_size, ended=ended
        )  # (members, items)
        if ended is not None:
            flags = torch.tensor(list(ended), dtype=torch.bool)
            rewards = torch.stack(
                [
                    penalise_unfinished(row, flags, self.missing_eos_penalty, self.unfinished_score)
                    for row in rewards
                ]
            )
        return rewards.double().numpy()

    def best_of_n_scores(
        self,
        prompts: Sequence[Messages],
        texts: Sequence[str],
        ended: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """((items,) reported scores as `rm_scores`, (items,) the scores best-of-n picks by):
        the same array without an ensemble, else the members' mean and their
        `best_of_n_aggregate`."""
        import torch

        from rlhf_core.algorithms.ensemble import conservative_reward

        if len(self.members) == 1:
            reported = self.rm_scores(prompts, texts, ended)
            return reported, reported
        members = self.member_rm_scores(prompts, texts, ended)  # (members, items)
        picked = conservative_reward(
            torch.from_numpy(members), self.best_of_n_aggregate, self.best_of_n_std_coef
        )
        return members.mean(axis=0), picked.double().numpy()

    def gold_scores(self, texts: Sequence[str]) -> np.ndarray | None:
        """(items,) float64 gold scores of `texts`, or None without a gold judge."""
        if self.gold_judge is None:
            return None
        return np.asarray(self.gold_judge.score_batch(texts), dtype=np.float64)


def expand_prompts(prompts: Sequence[Messages], samples_per_prompt: int) -> list[Messages]:
    """Each prompt repeated `samples_per_prompt` times in a row (the evaluation items)."""
    return [prompt for prompt in prompts for _ in range(samples_per_prompt)]


def sample_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Messages],
    judge: ResponseJudge,
    sampling: SamplingSettings,
    seed: int,
    *,
    reference_model: PreTrainedModel | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> PolicyResponses:
    """Sample one response per item from `model`, score it, and estimate KL to the reference.

    KL(π ‖ π_sft) ≈ mean over items of log π(y|x) − log π_sft(y|x) with y ~ π
    (`kl_from_logprob_sums`); `reference_model=None` means `model` is the reference (KL 0).
    """
    from rlhf_core.generation import generate, sequence_logprob_sums

    rollout = generate(model, tokenizer, items, sampling, seed, progress=progress)
    kl, stderr = 0.0, None
    if reference_model is not None:
        estimate = kl_from_logprob_sums(
            sequence_logprob_sums(model, rollout, batch_size),
            sequence_logprob_sums(reference_model, rollout, batch_size),
        )
        kl, stderr = estimate.mean, estimate.stderr
    return PolicyResponses(
        texts=rollout.texts,
        ended=rollout.ended,
        rm_scores=judge.rm_scores(items, rollout.texts, rollout.ended),
        gold_scores=judge.gold_scores(rollout.texts),
        kl_to_sft=kl,
        kl_to_sft_stderr=stderr,
    )


def select_best_of_n(
    candidates: Rollout, candidate_rm_scores: np.ndarray, n: int
) -> tuple[list[int], np.ndarray]:
    """For each item, the candidate with the highest reward among its first n.

    Args:
        candidates: (n_max · items) responses, candidate j of item i at row j · items + i.
        candidate_rm_scores: (items, n_max) reward of each candidate.
        n: how many candidates to choose from (1 ≤ n ≤ n_max); the first n of each item, so
            a larger n always chooses from a superset.

    Returns:
        (rows of `candidates` chosen, (items,) their rewards).
    """
    items, n_max = candidate_rm_scores.shape
    if not 1 <= n <= n_max:
        raise ValueError(f"n must be between 1 and {n_max} candidates but is {n}.")
    chosen = best_of_n_select(candidate_rm_scores[:, :n])  # (items,)
    rows = [int(column) * items + item for item, column in enumerate(chosen)]
    return rows, candidate_rm_scores[np.arange(items), chosen]


def sample_best_of_n(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Messages],
    judge: ResponseJudge,
    sampling: SamplingSettings,
    seed: int,
    ns: Sequence[int],
    *,
    progress: bool = False,
) -> dict[int, PolicyResponses]:
    """Best-of-n responses of the SFT `model` for each n in `ns`, from one candidate pool.

    max(ns) candidates per item are drawn with `seed` (pass one other than the SFT samples'
    seed, so that best-of-n is compared with an independent SFT sample) and scored once; each
    n keeps the best of the first n. KL is the analytic `best_of_n_kl(n)`. With a reward
    ensemble the best is by the judge's `best_of_n_aggregate` and the reported score is the
    members' mean (`ResponseJudge.best_of_n_scores`).
    """
    from rlhf_core.generation import generate

    n_max = max(ns)
    pool_prompts = list(items) * n_max  # candidate j of item i at row j · items + i
    candidates = generate(model, tokenizer, pool_prompts, sampling, seed, progress=progress)
    pool_rm, pool_pick = judge.best_of_n_scores(
        pool_prompts, candidates.texts, candidates.ended
    )  # (n_max · items,) each
    pool_pick = pool_pick.reshape(n_max, len(items)).T
    results = {}
    for n in ns:
        rows, _ = select_best_of_n(candidates, pool_pick, n)
        texts = [candidates.texts[row] for row in rows]
        results[n] = PolicyResponses(
            texts=texts,
            ended=[candidates.ended[row] for row in rows],
            rm_scores=pool_rm[rows],
            gold_scores=judge.gold_scores(texts),
            kl_to_sft=best_of_n_kl(n),
        )
    return results


def summarise(
    responses: PolicyResponses,
    sft: PolicyResponses,
    *,
    bootstrap: bool,
    seed: int,
    samples_per_prompt: int = 1,
) -> dict[str, float | None]:
    """`summarise_policy` of one policy against SFT, plus the KL's standard error and the share
    of responses that ended with EOS; gold metrics are None without a gold judge. Items are
    prompt-major (`expand_prompts`), so the bootstrap resamples whole prompts."""
    has_gold = responses.gold_scores is not None and sft.gold_scores is not None
    summary: dict[str, float | None] = dict(
        summarise_policy(
            # Without a gold judge the reward stands in, and its gold numbers are dropped below.
            gold_scores=responses.gold_scores if has_gold else responses.rm_scores,
            rm_scores=responses.rm_scores,
            sft_gold_scores=sft.gold_scores if has_gold else sft.rm_scores,
            sft_rm_scores=sft.rm_scores,
            texts=responses.texts,
            kl_to_sft=responses.kl_to_sft,
            with_ci=bootstrap,
            seed=seed,
            prompt_ids=np.arange(len(responses.texts)) // samples_per_prompt,
        )
    )
    if not has_gold:
        summary.update({key: None for key in summary if key.startswith("gold_")})
    stderr = responses.kl_to_sft_stderr  # NaN from a single sample
    summary["kl_to_sft_stderr"] = stderr if stderr is not None and math.isfinite(stderr) else None
    summary["ended_fraction"] = float(np.mean(responses.ended))
    return summary


# --------------------------------------------------------------------------------------------
# The reward model on held-out preference pairs
# --------------------------------------------------------------------------------------------


def reward_model_metrics(
    judge: ResponseJudge,
    held_out: pd.DataFrame,
    *,
    eval_set: str = "preference_held_out",
    annotator_temperature: float | None = None,
) -> dict[str, Any]:
    """The reward model on held-out preference pairs, and how far to trust it.

    eval_set names the pairs (the demo's `reward_eval` set, or the held-out split of the
    preference set); the rest is `reward_trust.reward_trust_metrics`: eval_accuracy (share of
    pairs where r(chosen) > r(rejected), ties wrong) with its 95% Wilson interval,
    eval_margin_mean, annotator_agreement (share of the labels that agree with the gold judge)
    and annotator_agreement_expected (the accuracy ceiling of the annotators' noise at
    `annotator_temperature`), the reward model's calibration (ECE against the labels and
    against the exact label probability), and accuracy by gold-margin bucket. Gold numbers are
    None without a gold judge, those that need the temperature None without it; everything
    but eval_set and eval_pairs is None when there are no held-out pairs.
    """
    from rlhf_core.evaluation.reward_trust import TRUST_KEYS, reward_trust_metrics

    if len(held_out) == 0:
        log.warning("No held-out preference pairs: the reward model's accuracy is not measured.")
        return {"eval_set": eval_set, **dict.fromkeys(TRUST_KEYS), "eval_pairs": 0}
    prompts = list(held_out["prompt"])
    chosen = judge.rm_scores(prompts, list(held_out["chosen"]))  # (pairs,)
    rejected = judge.rm_scores(prompts, list(held_out["rejected"]))  # (pairs,)
    chosen_gold = judge.gold_scores(list(held_out["chosen"]))  # (pairs,) or None
    rejected_gold = judge.gold_scores(list(held_out["rejected"]))
    return {
        "eval_set": eval_set,
        **reward_trust_metrics(chosen, rejected, chosen_gold, rejected_gold, annotator_temperature),
    }
