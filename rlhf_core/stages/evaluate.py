"""Stage `evaluate`: SFT, each aligned policy and best-of-n, compared on held-out prompts.

Every policy answers the same held-out prompts (`eval_prompts`) with the same sampling settings
and seed; each response is scored by the reward model and, on the demo task, by the gold judge
that the reward model never saw. A policy's sample i is compared with SFT's sample i on the
same prompt (paired win rates), and its KL to SFT is estimated from its own samples. Best-of-n
draws n fresh SFT candidates per prompt, keeps the one the reward model scores highest, and
sits on the KL axis at the analytic log n − (n − 1)/n (Gao et al. 2023, arXiv:2210.10760).
The reward model is also checked on held-out preference pairs (on the demo, the `reward_eval`
pairs about unseen titles that prepare writes; otherwise the held-out split of the preference
set): its accuracy with a 95% interval, next to the agreement of those labels with the gold
judge (the accuracy ceiling the annotators' noise allows), its calibration and its accuracy by
gold margin (`evaluation.reward_trust`).

With `sanity_prompts`, SFT and each policy also answer out-of-task questions greedily
(`evaluation.sanity`): `sanity_pass_fraction` per policy, the answers in sanity.md.

Outputs: artifacts/metrics/evaluate.json (DVC metrics), artifacts/evaluation/ (comparison
table, sample responses, every response with its scores, sanity answers),
artifacts/plots/reward_vs_kl.{png,json}; all logged to one MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.config.stages import EvaluateSettings
from rlhf_core.evaluation.comparison import (
    BEST_OF_N_PREFIX,
    REWARD_MODEL,
    SFT,
    ResponseJudge,
    expand_prompts,
    reward_model_metrics,
    sample_best_of_n,
    sample_policy,
    summarise,
)
from rlhf_core.evaluation.comparison_report import comparison_markdown, log_to_run, write_reports
from rlhf_core.evaluation.sanity import (
    SANITY_METRIC,
    SanityAnswer,
    answer_sanity_prompts,
    pass_fraction,
    sanity_markdown,
)
from rlhf_core.files import writing
from rlhf_core.generation import SamplingSettings, derived_seed
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext, load_validated, train_eval_split

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedTokenizerBase

    from rlhf_core.config import DataSettings
    from rlhf_core.data.gold import GoldJudge
    from rlhf_core.generation import Messages


log = logging.getLogger(__name__)

STAGE = "evaluate"
DEMO_META_FILE = "demo_meta.json"  # written by the prepare stage for the demo task


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


def _ensemble_members(paths: ProjectPaths) -> list:
    """The reward ensemble's members after member 0 (the reward model); [] without one."""
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.scoring import reward_member_dirs

    return [RewardModel.from_pretrained(d) for d in reward_member_dirs(paths.reward_model_dir)[1:]]


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
    context: StageContext,
    *,
    algorithms: Sequence[str],
) -> dict[str, Any]:
    """Evaluate SFT, each aligned policy in `algorithms` and best-of-n on the held-out prompts.

    Gold metrics come from the demo's gold judge when `data.source` is "demo" and are None
    otherwise. Writes evaluate.json, the reports and plots (see the module docstring) and
    returns the metrics: {policy: {metric: value}, "reward_model": {...}}.
    """
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.tracking.runs import stage_run

    data, seed, root = context.data, context.seed, context.root
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
    held_out_pairs, pairs_set, pairs_file = _reward_eval_pairs(paths, data)
    if pairs_set == REWARD_EVAL_SET:
        inputs[REWARD_EVAL_SET] = pairs_file
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
            run.log_dataset(held_out_pairs, pairs_set, "evaluation", source=pairs_file)
        device = context.device  # fp32 on every device (see ComputeSettings)
        sft_model, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        sft_model = sft_model.to(device)
        reward_model, reward_tokenizer = _load_reward_model(paths, tokenizer)
        reward_model = reward_model.to(device)
        judge = ResponseJudge(
            reward_model,
            reward_tokenizer,
            gold_judge,
            settings.batch_size,
            settings.missing_eos_penalty,
            settings.unfinished_score,
            # a reward ensemble: scores are the members' mean, best-of-n picks by the aggregate
            members=[reward_model, *(m.to(device) for m in _ensemble_members(paths))],
            best_of_n_aggregate=settings.best_of_n_aggregate,
            best_of_n_std_coef=settings.best_of_n_std_coef,
        )

        def sample(name, model, reference_model=None):
            # Each policy samples from a stream of its own: a win rate then compares two
            # independent draws, not two draws coupled through one random sequence.
            return sample_policy(
                model,
                tokenizer,
                items,
                judge,
                settings.sampling,
                derived_seed(seed, f"evaluate/{name}"),
                reference_model=reference_model,
                batch_size=settings.batch_size,
                progress=context.show_progress,
            )

        def answer_sanity(name, model):
            if settings.sanity_prompts:
                sanity[name] = answer_sanity_prompts(
                    model, tokenizer, settings.sanity_prompts, settings.sanity_max_new_tokens
                )

        sanity: dict[str, list[SanityAnswer]] = {}
        log.info("evaluate: %d responses per policy", len(items))
        started = time.perf_counter()
        responses = {SFT: sample(SFT, sft_model)}
        answer_sanity(SFT, sft_model)
        log.info("evaluate: sft sampled and scored in %.1f s", time.perf_counter() - started)
        for name in algorithms:
            started = time.perf_counter()
            policy, policy_tokenizer = load_causal_lm(str(paths.policy_dir(name)))
            _require_same_vocabulary(name, policy_tokenizer, tokenizer)
            policy = policy.to(device)
            responses[name] = sample(name, policy, reference_model=sft_model)
            answer_sanity(name, policy)
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
                derived_seed(seed, "evaluate/best_of_n"),
                settings.best_of_n,
                progress=context.show_progress,
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
                policy_responses,
                responses[SFT],
                bootstrap=settings.bootstrap,
                seed=seed,
                samples_per_prompt=settings.samples_per_prompt,
            )
            for name, policy_responses in responses.items()
        }
        for name, answers in sanity.items():
            results[name][SANITY_METRIC] = pass_fraction(answers)
        results[REWARD_MODEL] = reward_model_metrics(
            judge,
            held_out_pairs,
            eval_set=pairs_set,
            annotator_temperature=_annotator_temperature(data, demo_meta),
        )

        with writing("the evaluation reports and metrics", paths.evaluation_dir):
            written = write_reports(
                paths, results, prompts, responses, settings, has_gold=gold_judge is not None
            )
        if sanity:
            written["sanity"] = paths.evaluation_dir / "sanity.md"
            with writing("the sanity report", written["sanity"]):
                written["sanity"].write_text(sanity_markdown(sanity), encoding="utf-8")
        log_to_run(run, results, written)
        for path in written.values():
            run.record_output(path)
    log.info("evaluate: results\n%s", comparison_markdown(results, len(prompts), settings))
    return results


REWARD_EVAL_SET = "reward_eval"  # the demo's held-out pairs for the reward model
HELD_OUT_SPLIT = "preference_held_out"  # the held-out split of the preference set


def _reward_eval_pairs(paths: ProjectPaths, data: DataSettings) -> tuple[pd.DataFrame, str, Path]:
    """The pairs the reward model is checked on, their name, and the file they come from.

    On the demo, the reward_eval pairs prepare wrote (demo.n_reward_eval_pairs about titles no
    training row uses); otherwise, or when the demo wrote none, the held-out split of the
    validated preference set, the rows the reward stage held out.
    """
    import pandas as pd

    from rlhf_core.data.demo import FILE_NAMES, read_reward_eval

    reward_eval = paths.raw_dir / FILE_NAMES[REWARD_EVAL_SET]
    if data.source == "demo" and reward_eval.is_file():
        return pd.DataFrame(read_reward_eval(reward_eval)), REWARD_EVAL_SET, reward_eval
    _, held_out = train_eval_split(
        load_validated(paths, "preference"), data.eval_fraction, data.split_salt
    )
    return held_out, HELD_OUT_SPLIT, paths.validated_set("preference") / "valid.parquet"


def _annotator_temperature(data: DataSettings, demo_meta: Path) -> float | None:
    """The demo annotators' Bradley-Terry temperature from demo_meta.json; None off the demo."""
    if data.source != "demo" or not demo_meta.is_file():
        return None
    meta = json.loads(demo_meta.read_text(encoding="utf-8"))
    return float(meta["settings"]["annotator_temperature"])


def _gold_judge(data: DataSettings) -> GoldJudge | None:
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
