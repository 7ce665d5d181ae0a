"""Stage `evaluate`: SFT, each aligned policy and best-of-n, compared on held-out prompts.

Every policy answers the same held-out prompts (`eval_prompts`) with the same sampling settings
and seed; each response is scored by the reward model and, on the demo task, by the gold judge
that the reward model never saw. A policy's sample i is compared with SFT's sample i on the
same prompt (paired win rates), and its KL to SFT is estimated from its own samples. Best-of-n
draws n fresh SFT candidates per prompt, keeps the one the reward model scores highest, and
sits on the KL axis at the analytic log n − (n − 1)/n (Gao et al. 2023, arXiv:2210.10760).
The reward model is also checked on the held-out preference pairs, next to the agreement of
those labels with the gold judge (the accuracy ceiling the annotators' noise allows).

Outputs: artifacts/metrics/evaluate.json (DVC metrics), artifacts/evaluation/ (comparison
table, sample responses, every response with its scores), artifacts/plots/reward_vs_kl.{png,
json}; all logged to one MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_core.evaluation.metrics import (
    POLICY_SUMMARY_KEYS,
    best_of_n_kl,
    best_of_n_select,
    kl_from_logprob_sums,
    summarise_policy,
)
from rlhf_core.generation import SamplingSettings
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import load_validated, train_eval_split, write_json
from rlhf_core.stages.settings import EvaluateSettings

if TYPE_CHECKING:  # rlhf_core.config imports this module for its settings class
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_core.config import DataParams
    from rlhf_core.data.gold import GoldJudge
    from rlhf_core.generation import Messages, Rollout
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.tracking.runs import StageRun

log = logging.getLogger(__name__)

STAGE = "evaluate"
SFT = "sft"  # the reference policy's name in every result
REWARD_MODEL = "reward_model"  # the key of the reward model's block in evaluate.json
BEST_OF_N_PREFIX = "bon_"
DEMO_META_FILE = "demo_meta.json"  # written by the prepare stage for the demo task
# Columns of the comparison table, after the summary keys.
EXTRA_POLICY_KEYS = ("kl_to_sft_stderr", "ended_fraction")
CI_KEYS = tuple(
    f"{key}_ci_{end}"
    for key in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft")
    for end in ("low", "high")
)


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
    """Scores responses with the reward model and, when there is one, the gold judge."""

    def __init__(
        self,
        reward_model: RewardModel,
        tokenizer: PreTrainedTokenizerBase,
        gold_judge: GoldJudge | None,
        batch_size: int,
    ) -> None:
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.gold_judge = gold_judge
        self.batch_size = batch_size

    def rm_scores(self, prompts: Sequence[Messages], texts: Sequence[str]) -> np.ndarray:
        """(items,) float64 reward-model scores of `texts` as answers to `prompts`."""
        from rlhf_core.generation import score

        rewards = score(self.reward_model, self.tokenizer, prompts, texts, self.batch_size)
        return rewards.double().numpy()

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
        rm_scores=judge.rm_scores(items, rollout.texts),
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
    n keeps the best of the first n. KL is the analytic `best_of_n_kl(n)`.
    """
    from rlhf_core.generation import generate

    n_max = max(ns)
    pool_prompts = list(items) * n_max  # candidate j of item i at row j · items + i
    candidates = generate(model, tokenizer, pool_prompts, sampling, seed, progress=progress)
    pool_rm = judge.rm_scores(pool_prompts, candidates.texts).reshape(n_max, len(items)).T
    results = {}
    for n in ns:
        rows, rm_scores = select_best_of_n(candidates, pool_rm, n)
        texts = [candidates.texts[row] for row in rows]
        results[n] = PolicyResponses(
            texts=texts,
            ended=[candidates.ended[row] for row in rows],
            rm_scores=rm_scores,
            gold_scores=judge.gold_scores(texts),
            kl_to_sft=best_of_n_kl(n),
        )
    return results


def summarise(
    responses: PolicyResponses, sft: PolicyResponses, *, bootstrap: bool, seed: int
) -> dict[str, float | None]:
    """`summarise_policy` of one policy against SFT, plus the KL's standard error and the share
    of responses that ended with EOS; gold metrics are None without a gold judge."""
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


def reward_model_metrics(judge: ResponseJudge, held_out: pd.DataFrame) -> dict[str, Any]:
    """The reward model on held-out preference pairs, and the labels against the gold judge.

    eval_accuracy: share of pairs where r(chosen) > r(rejected) (`reward_accuracy`, ties
    wrong); eval_margin_mean: mean r(chosen) − r(rejected); annotator_agreement: share of the
    same labels that agree with the gold judge, gold(chosen) > gold(rejected) with ties ½
    (`gold.observed_agreement`), the accuracy a reward model can reach on these labels; None
    without a gold judge. All None when there are no held-out pairs.
    """
    import torch

    from rlhf_core.algorithms.preference import reward_accuracy
    from rlhf_core.data.gold import observed_agreement

    metrics: dict[str, Any] = {
        "eval_pairs": len(held_out),
        "eval_accuracy": None,
        "eval_margin_mean": None,
        "annotator_agreement": None,
    }
    if len(held_out) == 0:
        log.warning("No held-out preference pairs: the reward model's accuracy is not measured.")
        return metrics
    prompts = list(held_out["prompt"])
    chosen = judge.rm_scores(prompts, list(held_out["chosen"]))  # (pairs,)
    rejected = judge.rm_scores(prompts, list(held_out["rejected"]))  # (pairs,)
    metrics["eval_accuracy"] = float(
        reward_accuracy(torch.from_numpy(chosen), torch.from_numpy(rejected))
    )
    metrics["eval_margin_mean"] = float(np.mean(chosen - rejected))
    chosen_gold = judge.gold_scores(list(held_out["chosen"]))
    rejected_gold = judge.gold_scores(list(held_out["rejected"]))
    if chosen_gold is not None and rejected_gold is not None:
        metrics["annotator_agreement"] = observed_agreement(list(chosen_gold), list(rejected_gold))
    return metrics


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _missing_input(path: Path, what: str, stage: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path}: no {what} found; run the `{stage}` stage first (`dvc repro {stage}`)."
    )


def check_inputs(paths: ProjectPaths, algorithms: Sequence[str]) -> dict[str, Path]:
    """The stage's input paths by lineage name; a missing one is an error naming its stage."""
    names = list(algorithms)
    reserved = [
        name for name in names if name in (SFT, REWARD_MODEL) or name.startswith(BEST_OF_N_PREFIX)
    ]
    if reserved:
        raise ValueError(
            f"algorithms {reserved} clash with the names of other results ({SFT}, "
            f"{REWARD_MODEL}, {BEST_OF_N_PREFIX}<n>); rename them."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"algorithms lists a policy twice: {names}.")
    models = {
        SFT: (paths.sft_model_dir, "SFT model", "sft"),
        "reward": (paths.reward_model_dir, "reward model", "reward"),
        **{
            f"policy.{name}": (paths.policy_dir(name), f"{name} policy", f"policy@{name}")
            for name in names
        },
    }
    inputs = {}
    for name, (path, what, stage) in models.items():
        if not (path / "config.json").is_file():
            raise _missing_input(path, what, stage)
        inputs[name] = path
    for set_name in ("eval_prompts", "preference"):
        parquet = paths.validated_set(set_name) / "valid.parquet"
        if not parquet.is_file():
            raise FileNotFoundError(f"{parquet}: not found; run `rlhf stage validate` first.")
        inputs[set_name] = parquet
    return inputs


def _load_reward_model(paths: ProjectPaths, fallback_tokenizer: PreTrainedTokenizerBase):
    """The reward model and the tokenizer saved with it (else the SFT model's)."""
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_tokenizer

    reward_model = RewardModel.from_pretrained(paths.reward_model_dir)
    if (paths.reward_model_dir / "tokenizer_config.json").is_file():
        return reward_model, load_tokenizer(str(paths.reward_model_dir))
    return reward_model, fallback_tokenizer


def _require_same_vocabulary(
    name: str, tokenizer: PreTrainedTokenizerBase, sft_tokenizer: PreTrainedTokenizerBase
) -> None:
    if tokenizer.get_vocab() != sft_tokenizer.get_vocab():
        raise ValueError(
            f"The {name} policy's tokenizer differs from the SFT model's; KL to SFT needs both "
            "to share one vocabulary, so align the policy from the SFT model."
        )


def run_evaluate(
    settings: EvaluateSettings,
    *,
    algorithms: Sequence[str],
    data: DataParams,
    seed: int,
    root: Path = Path("."),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate SFT, each aligned policy in `algorithms` and best-of-n on the held-out prompts.

    Gold metrics come from the demo's gold judge when `data.source` is "demo" and are None
    otherwise. Writes evaluate.json, the reports and plots (see the module docstring) and
    returns the metrics: {policy: {metric: value}, "reward_model": {...}}.
    """
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.tracking.runs import stage_run

    paths = ProjectPaths(root)
    inputs = check_inputs(paths, algorithms)
    demo_meta = paths.raw_dir / DEMO_META_FILE
    if demo_meta.is_file():
        inputs["demo_meta"] = demo_meta
    prompt_frame = load_validated(paths, "eval_prompts")
    if settings.max_prompts is not None:
        prompt_frame = prompt_frame.head(settings.max_prompts)
    if len(prompt_frame) == 0:
        raise ValueError(f"{inputs['eval_prompts']} has no prompts to evaluate on.")
    prompts: list[Messages] = list(prompt_frame["prompt"])
    _, held_out_pairs = train_eval_split(
        load_validated(paths, "preference"), data.eval_fraction, data.split_salt
    )
    items = expand_prompts(prompts, settings.samples_per_prompt)
    gold_judge = _gold_judge(data)
    params = {
        STAGE: dataclasses.asdict(settings),
        "algorithms": list(algorithms),
        "data.source": data.source,
        "data.eval_fraction": data.eval_fraction,
        "data.split_salt": data.split_salt,
        "seed": seed,
    }
    _warn_if_kl_is_not_exact(settings.sampling)
    with stage_run(
        STAGE,
        project_root=root,
        params=params,
        inputs=inputs,
        label=f"best_of_n={','.join(map(str, settings.best_of_n)) or 'none'}",
    ) as run:
        run.log_dataset(prompt_frame, "eval_prompts", "evaluation", source=inputs["eval_prompts"])
        if len(held_out_pairs):
            run.log_dataset(
                held_out_pairs, "preference_held_out", "evaluation", source=inputs["preference"]
            )
        sft_model, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        reward_model, reward_tokenizer = _load_reward_model(paths, tokenizer)
        judge = ResponseJudge(reward_model, reward_tokenizer, gold_judge, settings.batch_size)

        def sample(model, reference_model=None):
            return sample_policy(
                model,
                tokenizer,
                items,
                judge,
                settings.sampling,
                seed,
                reference_model=reference_model,
                batch_size=settings.batch_size,
                progress=show_progress,
            )

        log.info("evaluate: %d responses per policy", len(items))
        started = time.perf_counter()
        responses = {SFT: sample(sft_model)}
        log.info("evaluate: sft sampled and scored in %.1f s", time.perf_counter() - started)
        for name in algorithms:
            started = time.perf_counter()
            policy, policy_tokenizer = load_causal_lm(str(paths.policy_dir(name)))
            _require_same_vocabulary(name, policy_tokenizer, tokenizer)
            responses[name] = sample(policy, reference_model=sft_model)
            del policy
            log.info(
                "evaluate: %s sampled and scored in %.1f s", name, time.perf_counter() - started
            )
        if settings.best_of_n:
            started = time.perf_counter()
            best_of_n = sample_best_of_n(
                sft_model,
                tokenizer,
                items,
                judge,
                settings.sampling,
                seed + 1,  # candidates independent of the SFT samples they are compared with
                settings.best_of_n,
                progress=show_progress,
            )
            for n in sorted(best_of_n):
                responses[f"{BEST_OF_N_PREFIX}{n}"] = best_of_n[n]
            log.info(
                "evaluate: best-of-%s sampled and scored in %.1f s",
                "/".join(map(str, sorted(settings.best_of_n))),
                time.perf_counter() - started,
            )
        results: dict[str, Any] = {
            name: summarise(
                policy_responses, responses[SFT], bootstrap=settings.bootstrap, seed=seed
            )
            for name, policy_responses in responses.items()
        }
        results[REWARD_MODEL] = reward_model_metrics(judge, held_out_pairs)

        written = write_reports(
            paths, results, prompts, responses, settings, has_gold=gold_judge is not None
        )
        log_to_run(run, results, written)
        for path in written.values():
            run.record_output(path)
    log.info("evaluate: results\n%s", comparison_markdown(results, len(prompts), settings))
    return results


def _gold_judge(data: DataParams) -> GoldJudge | None:
    if data.source != "demo":
        return None
    from rlhf_core.data.gold import GoldJudge

    return GoldJudge()


def _warn_if_kl_is_not_exact(sampling: SamplingSettings) -> None:
    plain_sampling = sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0
    if not (sampling.do_sample and plain_sampling):
        log.warning(
            "evaluate: sampling is not plain temperature-1 sampling, so kl_to_sft (log-ratios "
            "of the temperature-1 models on the sampled responses) is not the KL of the "
            "sampled policies."
        )


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def policy_results(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-policy part of the results (everything but the reward model's block)."""
    return {name: metrics for name, metrics in results.items() if name != REWARD_MODEL}


def comparison_markdown(
    results: Mapping[str, Any], num_prompts: int, settings: EvaluateSettings
) -> str:
    """The comparison report: policies × metrics, win-rate intervals, the reward model."""
    from rlhf_core.evaluation.report import comparison_table_markdown

    policies = policy_results(results)
    samples = settings.samples_per_prompt
    parts = [
        f"# Evaluation on {num_prompts} held-out prompts, {samples} sample(s) per prompt\n",
        comparison_table_markdown(policies, [*POLICY_SUMMARY_KEYS, *EXTRA_POLICY_KEYS]),
        "Win rates pair each response with SFT's response of the same index to the same "
        "prompt; a tie counts ½, so SFT against itself is 0.5. KL to SFT is in nats: a "
        "Monte-Carlo estimate from the policy's own samples (± kl_to_sft_stderr), and for "
        f"{BEST_OF_N_PREFIX}<n> the analytic log n − (n − 1)/n, an upper bound. gold_* come "
        "from the demo's gold judge (– without one); ended_fraction is the share of responses "
        "that ended with EOS before the token limit.\n",
    ]
    if settings.bootstrap:
        parts += [
            "## 95% bootstrap intervals of the win rates\n",
            comparison_table_markdown(policies, list(CI_KEYS)),
        ]
    parts += [
        "## Reward model on the held-out preference pairs\n",
        _key_value_table(results[REWARD_MODEL]),
        "annotator_agreement is how often the held-out labels agree with the gold judge: the "
        "highest eval_accuracy a reward model can expect on them.\n",
    ]
    return "\n".join(parts)


def _key_value_table(values: Mapping[str, Any]) -> str:
    from rlhf_core.evaluation.report import format_value

    rows = [f"| {key} | {format_value(value)} |" for key, value in values.items()]
    return "\n".join(["| metric | value |", "| --- | ---: |", *rows]) + "\n"


def reward_vs_kl_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per policy, `{policy, kl_to_sft, gold_score_mean, rm_score_mean}`, for DVC plots."""
    return [
        {
            "policy": name,
            "kl_to_sft": metrics["kl_to_sft"],
            "gold_score_mean": metrics["gold_score_mean"],
            "rm_score_mean": metrics["rm_score_mean"],
        }
        for name, metrics in policy_results(results).items()
    ]


def response_rows(
    prompts: Sequence[Messages], responses: Mapping[str, PolicyResponses], samples_per_prompt: int
) -> list[dict[str, Any]]:
    """Every evaluated response with its scores: one row per policy and item."""
    from rlhf_core.evaluation.report import prompt_text

    rows = []
    for name, policy in responses.items():
        for item, text in enumerate(policy.texts):
            prompt_index, sample_index = divmod(item, samples_per_prompt)
            rows.append(
                {
                    "policy": name,
                    "prompt_index": prompt_index,
                    "sample_index": sample_index,
                    "prompt": prompt_text(prompts[prompt_index]),
                    "response": text,
                    "ended": policy.ended[item],
                    "rm_score": float(policy.rm_scores[item]),
                    "gold_score": None
                    if policy.gold_scores is None
                    else float(policy.gold_scores[item]),
                }
            )
    return rows


def write_reports(
    paths: ProjectPaths,
    results: Mapping[str, Any],
    prompts: Sequence[Messages],
    responses: Mapping[str, PolicyResponses],
    settings: EvaluateSettings,
    *,
    has_gold: bool,
) -> dict[str, Path]:
    """Write the metrics, reports and plots at their fixed paths; return them by name.

    Names: metrics, evaluation (folder: comparison.md, samples.md, responses.jsonl),
    reward_vs_kl_png, reward_vs_kl_json. The evaluation folder is rewritten from scratch.
    """
    import shutil

    from rlhf_core.evaluation.report import reward_vs_kl_figure, samples_markdown

    written = {"metrics": write_json(paths.metrics_file(STAGE), dict(results))}
    out = paths.evaluation_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "comparison.md").write_text(
        comparison_markdown(results, len(prompts), settings), encoding="utf-8"
    )
    first_samples = range(
        0, len(prompts) * settings.samples_per_prompt, settings.samples_per_prompt
    )
    score_kind = "gold" if has_gold else "rm"
    score_name = "the gold judge" if has_gold else "the reward model"
    (out / "samples.md").write_text(
        f"# Sample responses (first sample per prompt; scores from {score_name})\n\n"
        + samples_markdown(
            prompts,
            {name: [policy.texts[i] for i in first_samples] for name, policy in responses.items()},
            {
                name: [float(getattr(policy, f"{score_kind}_scores")[i]) for i in first_samples]
                for name, policy in responses.items()
            },
            limit=settings.samples_in_report,
        ),
        encoding="utf-8",
    )
    with (out / "responses.jsonl").open("w", encoding="utf-8") as handle:
        for row in response_rows(prompts, responses, settings.samples_per_prompt):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    written["evaluation"] = out

    paths.plots_dir.mkdir(parents=True, exist_ok=True)
    figure = reward_vs_kl_figure(
        policy_results(results),
        y=f"{score_kind}_score_mean",
        title="Reward vs KL to SFT on held-out prompts",
    )
    written["reward_vs_kl_png"] = paths.plots_dir / "reward_vs_kl.png"
    figure.savefig(written["reward_vs_kl_png"], dpi=120)
    written["reward_vs_kl_json"] = write_json(
        paths.plots_dir / "reward_vs_kl.json", reward_vs_kl_rows(results)
    )
    return written


def log_to_run(run: StageRun, results: Mapping[str, Any], written: Mapping[str, Path]) -> None:
    """Log every number as `<policy>/<metric>` and the reports, plots and metrics as artifacts."""
    metrics = {
        f"{name}/{key}": value
        for name, block in results.items()
        for key, value in block.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }
    run.log_metrics(metrics, step=0)
    run.log_artifacts(written["evaluation"], "evaluation")
    run.log_artifact(written["reward_vs_kl_png"], "plots")
    run.log_artifact(written["reward_vs_kl_json"], "plots")
    run.log_artifact(written["metrics"], "metrics")
