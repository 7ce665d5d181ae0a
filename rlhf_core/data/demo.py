"""The embedded demo task: controlled-sentiment movie reviews in miniature.

After the IMDb experiment of DPO (Rafailov et al. 2023, arXiv:2305.18290, §6.1), where the
policy continues a review and is rewarded for positive sentiment. Here a user asks for a short
review of a made-up film; responses come from a small grammar over phrase banks (a few hundred
words, 12-40 words per review) so that a tiny model trained from scratch for minutes can learn
the language, yet vary in sentiment (positive, mixed, negative) and quality (fluent, or
degenerate: repetition loops, truncation, off-topic). The gold judge (`gold.GoldJudge`) scores
responses; simulated annotators (`gold.SimulatedAnnotators`) label pairs with known noise.

Evaluation prompts use film titles that no training prompt uses (a fixed hash split of the
title pool, independent of the seed), so the policy is evaluated on unseen prompts. The
reward-evaluation pairs (`reward_eval`) are labelled like the preference pairs but asked about
those unseen titles too: a held-out set for the reward model, large enough (1000 pairs by
default, against the ~150 of a 10% split) to put a tight interval on its accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rlhf_core.config.data import DemoSettings
from rlhf_core.data.demo_grammar import (
    DEGENERATE_KINDS,
    EVAL_TITLES,
    TRAIN_TITLES,
    FilmPrompt,
    degenerate_review,
    fluent_review,
    sample_prompt,
)
from rlhf_core.data.gold import (
    GoldJudge,
    SimulatedAnnotators,
    expected_agreement,
    observed_agreement,
    words_of,
)
from rlhf_core.data.texts import corpus_from_rows

CREATED_AT_BASE = datetime(2024, 1, 1, tzinfo=UTC)


def sample_response(rng: random.Random, film: FilmPrompt, settings: DemoSettings) -> str:
    """One response from the SFT-like distribution: mixed sentiment, mostly fluent."""
    if rng.random() < settings.degenerate_prob:
        return degenerate_review(rng, film, rng.choice(DEGENERATE_KINDS))
    draw = rng.random()
    if draw < settings.positive_prob:
        sentiment = "positive"
    elif draw < settings.positive_prob + settings.negative_prob:
        sentiment = "negative"
    else:
        sentiment = "mixed"
    return fluent_review(rng, film, sentiment)


def _distinct_responses(
    rng: random.Random, film: FilmPrompt, settings: DemoSettings, count: int
) -> list[str]:
    responses: list[str] = []
    for _ in range(100 * count):
        response = sample_response(rng, film, settings)
        if response not in responses:
            responses.append(response)
            if len(responses) == count:
                return responses
    raise ValueError(
        f"could not draw {count} distinct responses for one prompt; lower demo.ranking_k."
    )


# ---------------------------------------------------------------- the data set
@dataclass
class DemoData:
    """The generated demo task: canonical rows per set, and statistics for demo_meta.json."""

    sft: list[dict[str, Any]]
    preferences: list[dict[str, Any]]
    rankings: list[dict[str, Any]]
    ppo_prompts: list[dict[str, Any]]
    eval_prompts: list[dict[str, Any]]
    reward_eval: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def created_at(seed: int) -> str:
    """The fixed ISO-8601 timestamp stamped on a seed's rows (not wall-clock: files reproduce)."""
    return (CREATED_AT_BASE + timedelta(days=seed % 3650)).isoformat()


def _stream(settings: DemoSettings, name: str) -> random.Random:
    # One independent stream per set: changing one set's size leaves the others unchanged.
    return random.Random(f"rlhf-demo/{settings.seed}/{name}")


def _sft_rows(settings: DemoSettings) -> list[dict[str, Any]]:
    rng = _stream(settings, "sft")
    rows = []
    for _ in range(settings.n_sft):
        film = sample_prompt(rng, TRAIN_TITLES)
        rows.append({"prompt": film.messages(), "completion": sample_response(rng, film, settings)})
    return rows


def _preference_rows(
    settings: DemoSettings,
    judge: GoldJudge,
    name: str = "preferences",
    titles: list[str] = TRAIN_TITLES,
    count: int | None = None,
) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """Labelled pairs about `titles` (stream `name`, `count` pairs; by default the training
    preference set), and the gold scores of their chosen and rejected responses."""
    rng = _stream(settings, name)
    annotators = SimulatedAnnotators(
        settings.annotator_temperature, settings.n_annotators, seed=rng.randrange(2**63)
    )
    rows, chosen_golds, rejected_golds = [], [], []
    for _ in range(settings.n_preference_prompts if count is None else count):
        film = sample_prompt(rng, titles)
        first, second = _distinct_responses(rng, film, settings, 2)
        first_gold, second_gold = judge.score(first), judge.score(second)
        label = annotators.label_pair(first_gold, second_gold)
        if label.a_preferred:
            chosen, rejected, chosen_gold, rejected_gold = first, second, first_gold, second_gold
        else:
            chosen, rejected, chosen_gold, rejected_gold = second, first, second_gold, first_gold
        chosen_golds.append(chosen_gold)
        rejected_golds.append(rejected_gold)
        rows.append(
            {
                "prompt": film.messages(),
                "chosen": chosen,
                "rejected": rejected,
                "source": "demo",
                "annotator": label.annotator,
                "created_at": created_at(settings.seed),
            }
        )
    return rows, chosen_golds, rejected_golds


def _ranking_rows(settings: DemoSettings, judge: GoldJudge) -> list[dict[str, Any]]:
    rng = _stream(settings, "rankings")
    annotators = SimulatedAnnotators(
        settings.annotator_temperature, settings.n_annotators, seed=rng.randrange(2**63)
    )
    rows = []
    for _ in range(settings.n_ranked):
        film = sample_prompt(rng, TRAIN_TITLES)
        responses = _distinct_responses(rng, film, settings, settings.ranking_k)
        order = annotators.rank(judge.score_batch(responses)).order
        rows.append({"prompt": film.messages(), "responses": [responses[i] for i in order]})
    return rows


def _prompt_rows(settings: DemoSettings, name: str, titles: list[str], count: int) -> list[dict]:
    """`count` distinct prompts about films from `titles` (a repeated prompt is a duplicate row)."""
    rng = _stream(settings, name)
    seen: set[str] = set()
    rows = []
    while len(rows) < count:
        film = sample_prompt(rng, titles)
        if film.text not in seen:
            seen.add(film.text)
            rows.append({"prompt": film.messages()})
    return rows


def _rounded(value: float) -> float:
    return round(value, 6)


def _quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def generate_demo(settings: DemoSettings, judge: GoldJudge | None = None) -> DemoData:
    """Generate every set of the demo task for `settings` (deterministic given the seed)."""
    judge = judge or GoldJudge()
    sft = _sft_rows(settings)
    preferences, chosen_golds, rejected_golds = _preference_rows(settings, judge)
    reward_eval, eval_chosen_golds, eval_rejected_golds = _preference_rows(
        settings, judge, "reward_eval", EVAL_TITLES, settings.n_reward_eval_pairs
    )
    data = DemoData(
        sft=sft,
        preferences=preferences,
        rankings=_ranking_rows(settings, judge),
        ppo_prompts=_prompt_rows(settings, "ppo_prompts", TRAIN_TITLES, settings.n_ppo_prompts),
        eval_prompts=_prompt_rows(settings, "eval_prompts", EVAL_TITLES, settings.n_eval_prompts),
        reward_eval=reward_eval,
    )

    sft_scores = [judge.breakdown(row["completion"]) for row in sft]
    sft_golds = [score.score for score in sft_scores]
    chosen_longer = sum(
        len(words_of(row["chosen"])) > len(words_of(row["rejected"])) for row in preferences
    )
    temperature = settings.annotator_temperature
    data.meta = {
        "task": "controlled-sentiment movie reviews (after DPO, arXiv:2305.18290, section 6.1)",
        "settings": dataclasses.asdict(settings),
        "created_at": created_at(settings.seed),
        "counts": {name: len(getattr(data, name)) for name in FILE_NAMES},
        "gold": {
            "range": [-1.0, 1.0],
            "sft_completion_mean": _rounded(statistics.fmean(sft_golds)),
            "sft_completion_stdev": _rounded(statistics.pstdev(sft_golds)),
            "sft_completion_p90": _rounded(_quantile(sft_golds, 0.9)),
            "sft_completion_max": _rounded(max(sft_golds)),
            "sft_degenerate_fraction": _rounded(
                sum(score.quality < 1.0 for score in sft_scores) / len(sft_scores)
            ),
            "chosen_mean": _rounded(statistics.fmean(chosen_golds)),
            "rejected_mean": _rounded(statistics.fmean(rejected_golds)),
        },
        "annotator_agreement_expected": _rounded(
            expected_agreement(chosen_golds, rejected_golds, temperature)
        ),
        "annotator_agreement_empirical": _rounded(observed_agreement(chosen_golds, rejected_golds)),
        "reward_eval_agreement_expected": _rounded(
            expected_agreement(eval_chosen_golds, eval_rejected_golds, temperature)
        )
        if reward_eval
        else None,
        "chosen_longer_fraction": _rounded(chosen_longer / len(preferences)),
        "vocabulary_size": len({word for text in corpus_texts(data) for word in words_of(text)}),
    }
    return data


def corpus_texts(data: DemoData) -> Iterator[str]:
    """The texts of the demo's training and prompt sets (prompts and responses), e.g. to train
    a tokenizer; the reward-evaluation pairs are left out (only evaluation reads them)."""
    for rows in (data.sft, data.preferences, data.rankings, data.ppo_prompts, data.eval_prompts):
        yield from corpus_from_rows(rows)


# ---------------------------------------------------------------- files
FILE_NAMES = {
    "sft": "sft.jsonl",
    "preferences": "preferences.jsonl",
    "rankings": "rankings.jsonl",
    "ppo_prompts": "ppo_prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "reward_eval": "reward_eval.jsonl",
}
OPTIONAL_SETS = {"rankings": "n_ranked", "reward_eval": "n_reward_eval_pairs"}  # 0: no file
META_FILE = "demo_meta.json"


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_reward_eval(path: str | Path) -> list[dict[str, Any]]:
    """The reward-evaluation pairs `write_demo` wrote to `path`, each with prompt, chosen and
    rejected; a row without them is an error that names the file."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            row = json.loads(line)
            missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
            if missing:
                raise ValueError(
                    f"{path}:{number}: a reward-evaluation pair lacks {missing}; regenerate the "
                    "demo data with `dvc repro prepare`."
                )
            rows.append(row)
    return rows


def write_demo(settings: DemoSettings, out_dir: str | Path) -> dict[str, Any]:
    """Generate the demo and write it as canonical JSONL plus demo_meta.json; return the meta.

    Files: sft.jsonl, preferences.jsonl, rankings.jsonl (only when n_ranked > 0),
    ppo_prompts.jsonl, eval_prompts.jsonl, reward_eval.jsonl (only when n_reward_eval_pairs > 0;
    a stale optional file is removed otherwise), demo_meta.json. The same settings give
    byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = generate_demo(settings)
    written = []
    for name, file_name in FILE_NAMES.items():
        rows = getattr(data, name)
        if name in OPTIONAL_SETS and getattr(settings, OPTIONAL_SETS[name]) == 0:
            (out / file_name).unlink(missing_ok=True)
            continue
        _write_jsonl(rows, out / file_name)
        written.append(file_name)
    meta = {**data.meta, "files": written}
    (out / META_FILE).write_text(
        json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return meta
