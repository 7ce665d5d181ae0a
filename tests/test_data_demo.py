"""Tests of rlhf_core/data/demo.py: the embedded controlled-sentiment demo task."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import statistics
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_core.data import demo_grammar
from rlhf_core.data.demo import (
    DemoData,
    DemoSettings,
    corpus_texts,
    created_at,
    generate_demo,
    read_reward_eval,
    sample_response,
    write_demo,
)
from rlhf_core.data.demo_grammar import fluent_review, sample_prompt
from rlhf_core.data.gold import FILM_WORDS, GoldJudge, expected_agreement, words_of
from rlhf_core.data.texts import corpus_from_rows

SMALL = DemoSettings(
    seed=3,
    n_sft=120,
    n_preference_prompts=150,
    n_ranked=20,
    n_ppo_prompts=40,
    n_eval_prompts=30,
    n_reward_eval_pairs=60,
)
JSONL_FILES = [
    "sft.jsonl",
    "preferences.jsonl",
    "rankings.jsonl",
    "ppo_prompts.jsonl",
    "eval_prompts.jsonl",
    "reward_eval.jsonl",
]


@pytest.fixture(scope="module")
def judge() -> GoldJudge:
    return GoldJudge()


@pytest.fixture(scope="module")
def default_data() -> DemoData:
    return generate_demo(DemoSettings())


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    write_demo(SMALL, out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompt_text(row: dict) -> str:
    return row["prompt"][0]["content"]


def binomial_tolerance(probability: float, draws: int, standard_errors: float = 3.0) -> float:
    return standard_errors * math.sqrt(probability * (1.0 - probability) / draws)


# ---------------------------------------------------------------- files and determinism
def test_same_seed_gives_byte_identical_files(small_dir: Path, tmp_path: Path) -> None:
    write_demo(SMALL, tmp_path)
    for name in [*JSONL_FILES, "demo_meta.json"]:
        assert (tmp_path / name).read_bytes() == (small_dir / name).read_bytes(), name


def test_different_seed_gives_different_files(small_dir: Path, tmp_path: Path) -> None:
    other = dataclasses.replace(SMALL, seed=SMALL.seed + 1)
    write_demo(other, tmp_path)
    for name in [*JSONL_FILES, "demo_meta.json"]:
        assert (tmp_path / name).read_bytes() != (small_dir / name).read_bytes(), name


def test_sizes_are_as_configured(small_dir: Path) -> None:
    sizes = {
        "sft.jsonl": SMALL.n_sft,
        "preferences.jsonl": SMALL.n_preference_prompts,
        "rankings.jsonl": SMALL.n_ranked,
        "ppo_prompts.jsonl": SMALL.n_ppo_prompts,
        "eval_prompts.jsonl": SMALL.n_eval_prompts,
        "reward_eval.jsonl": SMALL.n_reward_eval_pairs,
    }
    for name, size in sizes.items():
        assert len(read_jsonl(small_dir / name)) == size, name
    rankings = read_jsonl(small_dir / "rankings.jsonl")
    assert all(len(row["responses"]) == SMALL.ranking_k for row in rankings)


def test_no_rankings_file_when_ranking_is_disabled(tmp_path: Path) -> None:
    (tmp_path / "rankings.jsonl").write_text("stale\n", encoding="utf-8")
    meta = write_demo(
        DemoSettings(n_sft=5, n_preference_prompts=5, n_ranked=0, n_reward_eval_pairs=5), tmp_path
    )
    assert not (tmp_path / "rankings.jsonl").exists()
    assert "rankings.jsonl" not in meta["files"]
    assert meta["counts"]["rankings"] == 0


def test_no_reward_eval_file_when_it_is_disabled(tmp_path: Path) -> None:
    (tmp_path / "reward_eval.jsonl").write_text("stale\n", encoding="utf-8")
    meta = write_demo(
        DemoSettings(n_sft=5, n_preference_prompts=5, n_reward_eval_pairs=0), tmp_path
    )
    assert not (tmp_path / "reward_eval.jsonl").exists()
    assert "reward_eval.jsonl" not in meta["files"]
    assert meta["counts"]["reward_eval"] == 0
    assert meta["reward_eval_agreement_expected"] is None


def test_one_set_size_does_not_change_the_other_sets(small_dir: Path, tmp_path: Path) -> None:
    write_demo(
        dataclasses.replace(SMALL, n_ranked=3, n_ppo_prompts=7, n_reward_eval_pairs=20), tmp_path
    )
    for name in ["sft.jsonl", "preferences.jsonl", "eval_prompts.jsonl"]:
        assert (tmp_path / name).read_bytes() == (small_dir / name).read_bytes(), name
    # A smaller reward-evaluation set is the start of the larger one.
    fewer = (tmp_path / "reward_eval.jsonl").read_text(encoding="utf-8").splitlines()
    more = (small_dir / "reward_eval.jsonl").read_text(encoding="utf-8").splitlines()
    assert fewer == more[:20]


# ---------------------------------------------------------------- canonical schema
def assert_canonical_prompt(row: dict) -> None:
    prompt = row["prompt"]
    assert isinstance(prompt, list) and len(prompt) == 1
    assert set(prompt[0]) == {"role", "content"}
    assert prompt[0]["role"] == "user"
    assert isinstance(prompt[0]["content"], str) and prompt[0]["content"].strip()


def assert_text(value: object) -> None:
    assert isinstance(value, str) and value.strip()


def test_every_row_has_the_canonical_schema(small_dir: Path) -> None:
    for row in read_jsonl(small_dir / "sft.jsonl"):
        assert set(row) == {"prompt", "completion"}
        assert_canonical_prompt(row)
        assert_text(row["completion"])
    pair_rows = [
        *read_jsonl(small_dir / "preferences.jsonl"),
        *read_jsonl(small_dir / "reward_eval.jsonl"),
    ]
    for row in pair_rows:
        assert set(row) == {"prompt", "chosen", "rejected", "source", "annotator", "created_at"}
        assert_canonical_prompt(row)
        assert_text(row["chosen"])
        assert_text(row["rejected"])
        assert row["chosen"] != row["rejected"]
        assert row["source"] == "demo"
        assert re.fullmatch(r"annotator-[0-9]+", row["annotator"])
        assert int(row["annotator"].split("-")[1]) < SMALL.n_annotators
        assert row["created_at"] == created_at(SMALL.seed)
        assert datetime.fromisoformat(row["created_at"]).tzinfo is not None
    for row in read_jsonl(small_dir / "rankings.jsonl"):
        assert set(row) == {"prompt", "responses"}
        assert_canonical_prompt(row)
        for response in row["responses"]:
            assert_text(response)
        assert len(set(row["responses"])) == len(row["responses"])
    for name in ["ppo_prompts.jsonl", "eval_prompts.jsonl"]:
        rows = read_jsonl(small_dir / name)
        for row in rows:
            assert set(row) == {"prompt"}
            assert_canonical_prompt(row)
        assert len({prompt_text(row) for row in rows}) == len(rows)  # no duplicate rows


def test_created_at_comes_from_the_seed_not_the_clock() -> None:
    assert created_at(0) == created_at(0)
    assert created_at(0) != created_at(1)
    assert datetime.fromisoformat(created_at(5)) > datetime.fromisoformat(created_at(4))


def test_meta_records_settings_counts_and_statistics(small_dir: Path, judge: GoldJudge) -> None:
    meta = json.loads((small_dir / "demo_meta.json").read_text(encoding="utf-8"))
    assert meta["settings"] == dataclasses.asdict(SMALL)
    assert meta["counts"]["preferences"] == SMALL.n_preference_prompts
    assert meta["files"] == JSONL_FILES
    pairs = read_jsonl(small_dir / "preferences.jsonl")
    chosen = judge.score_batch(row["chosen"] for row in pairs)
    rejected = judge.score_batch(row["rejected"] for row in pairs)
    assert meta["gold"]["chosen_mean"] == pytest.approx(statistics.fmean(chosen), abs=1e-6)
    assert meta["gold"]["rejected_mean"] == pytest.approx(statistics.fmean(rejected), abs=1e-6)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    assert meta["annotator_agreement_empirical"] == pytest.approx(statistics.fmean(wins), abs=1e-6)
    expected = expected_agreement(chosen, rejected, SMALL.annotator_temperature)
    assert meta["annotator_agreement_expected"] == pytest.approx(expected, abs=1e-6)
    assert meta["counts"]["reward_eval"] == SMALL.n_reward_eval_pairs
    held_out = read_jsonl(small_dir / "reward_eval.jsonl")
    held_out_expected = expected_agreement(
        judge.score_batch(row["chosen"] for row in held_out),
        judge.score_batch(row["rejected"] for row in held_out),
        SMALL.annotator_temperature,
    )
    assert meta["reward_eval_agreement_expected"] == pytest.approx(held_out_expected, abs=1e-6)
    longer = [len(words_of(row["chosen"])) > len(words_of(row["rejected"])) for row in pairs]
    assert meta["chosen_longer_fraction"] == pytest.approx(statistics.fmean(longer), abs=1e-6)
    completions = judge.score_batch(
        row["completion"] for row in read_jsonl(small_dir / "sft.jsonl")
    )
    assert meta["gold"]["sft_completion_mean"] == pytest.approx(
        statistics.fmean(completions), abs=1e-6
    )


# ---------------------------------------------------------------- held-out prompts
def test_eval_prompts_are_disjoint_from_training_prompts(default_data: DemoData) -> None:
    training_rows = [
        *default_data.sft,
        *default_data.preferences,
        *default_data.rankings,
        *default_data.ppo_prompts,
    ]
    training_prompts = {prompt_text(row) for row in training_rows}
    eval_prompts = {prompt_text(row) for row in default_data.eval_prompts}
    assert not training_prompts & eval_prompts
    eval_titles = {
        title for title in demo_grammar.ALL_TITLES if any(title in p for p in eval_prompts)
    }
    assert eval_titles
    training_text = "\n".join(corpus_from_rows(training_rows))
    assert not any(title in training_text for title in eval_titles)


def test_reward_eval_pairs_are_many_and_about_titles_no_training_row_uses(
    default_data: DemoData,
) -> None:
    pairs = default_data.reward_eval
    assert len(pairs) == DemoSettings().n_reward_eval_pairs >= 1000
    training_rows = [*default_data.sft, *default_data.preferences, *default_data.ppo_prompts]
    training_text = "\n".join(corpus_from_rows(training_rows))
    titles = {
        title
        for title in demo_grammar.ALL_TITLES
        if any(title in prompt_text(row) for row in pairs)
    }
    assert titles <= set(demo_grammar.EVAL_TITLES)
    assert len(titles) > 10
    assert not any(title in training_text for title in titles)
    # Not in the tokenizer's corpus either: only evaluation reads them.
    naming_a_title = [row["chosen"] for row in pairs if any(t in row["chosen"] for t in titles)]
    assert naming_a_title and not set(naming_a_title) & set(corpus_texts(default_data))


def test_reward_eval_labels_match_the_analytic_ceiling(
    default_data: DemoData, judge: GoldJudge
) -> None:
    pairs = default_data.reward_eval
    chosen = judge.score_batch(row["chosen"] for row in pairs)
    rejected = judge.score_batch(row["rejected"] for row in pairs)
    expected = default_data.meta["reward_eval_agreement_expected"]
    assert expected == pytest.approx(
        expected_agreement(chosen, rejected, DemoSettings().annotator_temperature), abs=1e-6
    )
    assert abs(empirical_agreement(chosen, rejected) - expected) < binomial_tolerance(
        expected, len(pairs)
    )


def test_read_reward_eval_returns_the_written_pairs_and_names_a_bad_row(
    small_dir: Path, tmp_path: Path
) -> None:
    assert read_reward_eval(small_dir / "reward_eval.jsonl") == read_jsonl(
        small_dir / "reward_eval.jsonl"
    )
    broken = tmp_path / "reward_eval.jsonl"
    broken.write_text('{"prompt": [], "chosen": "a", "rejected": "b"}\n{"prompt": []}\n')
    with pytest.raises(ValueError, match=r"reward_eval.jsonl:2: .*'chosen', 'rejected'.*prepare"):
        read_reward_eval(broken)


def test_prompt_sets_hold_distinct_prompts(default_data: DemoData) -> None:
    for rows in (default_data.ppo_prompts, default_data.eval_prompts):
        assert len({prompt_text(row) for row in rows}) == len(rows)


def test_title_split_is_fixed_and_holds_out_about_a_fifth() -> None:
    assert not set(demo_grammar.TRAIN_TITLES) & set(demo_grammar.EVAL_TITLES)
    assert len(demo_grammar.TRAIN_TITLES) + len(demo_grammar.EVAL_TITLES) == len(
        demo_grammar.ALL_TITLES
    )
    assert 0.1 < len(demo_grammar.EVAL_TITLES) / len(demo_grammar.ALL_TITLES) < 0.3


# ---------------------------------------------------------------- annotators on the demo
def gold_pairs(data: DemoData, judge: GoldJudge) -> tuple[list[float], list[float]]:
    chosen = judge.score_batch(row["chosen"] for row in data.preferences)
    rejected = judge.score_batch(row["rejected"] for row in data.preferences)
    return chosen, rejected


def empirical_agreement(chosen: list[float], rejected: list[float]) -> float:
    hits = 0.0
    for chosen_gold, rejected_gold in zip(chosen, rejected, strict=True):
        hits += 1.0 if chosen_gold > rejected_gold else 0.5 if chosen_gold == rejected_gold else 0.0
    return hits / len(chosen)


def test_label_agreement_matches_the_analytic_expectation(
    default_data: DemoData, judge: GoldJudge
) -> None:
    chosen, rejected = gold_pairs(default_data, judge)
    expected = expected_agreement(chosen, rejected, DemoSettings().annotator_temperature)
    empirical = empirical_agreement(chosen, rejected)
    assert abs(empirical - expected) < binomial_tolerance(expected, len(chosen))
    assert 0.85 <= expected <= 0.9  # the default temperature's documented ceiling


def test_noiseless_annotators_always_agree_with_gold(judge: GoldJudge) -> None:
    data = generate_demo(
        DemoSettings(
            n_sft=1, n_preference_prompts=400, n_reward_eval_pairs=0, annotator_temperature=0
        )
    )
    chosen, rejected = gold_pairs(data, judge)
    assert all(c >= r for c, r in zip(chosen, rejected, strict=True))
    untied = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c != r]
    assert len(untied) > 350
    assert empirical_agreement(*zip(*untied, strict=True)) == 1.0


def test_very_noisy_annotators_agree_with_gold_half_the_time(judge: GoldJudge) -> None:
    data = generate_demo(
        DemoSettings(
            n_sft=1,
            n_preference_prompts=1000,
            n_reward_eval_pairs=0,
            annotator_temperature=1000.0,
        )
    )
    chosen, rejected = gold_pairs(data, judge)
    assert abs(empirical_agreement(chosen, rejected) - 0.5) < binomial_tolerance(0.5, 1000)


def test_rankings_put_higher_gold_first_when_noiseless(judge: GoldJudge) -> None:
    data = generate_demo(
        DemoSettings(n_sft=1, n_preference_prompts=1, n_ranked=30, annotator_temperature=0)
    )
    for row in data.rankings:
        golds = judge.score_batch(row["responses"])
        assert golds == sorted(golds, reverse=True)


# ---------------------------------------------------------------- the response distribution
def test_sft_policy_is_near_neutral_with_room_to_improve(
    default_data: DemoData, judge: GoldJudge
) -> None:
    golds = judge.score_batch(row["completion"] for row in default_data.sft)
    mean = statistics.fmean(golds)
    assert -0.3 <= mean <= 0.3
    assert sum(g > 0.5 for g in golds) / len(golds) > 0.2  # positive reviews exist
    assert sum(g < -0.5 for g in golds) / len(golds) > 0.2  # and so do negative ones
    best_decile = sorted(golds)[int(0.9 * len(golds)) :]
    assert statistics.fmean(best_decile) - mean > 0.7


def test_sft_completions_are_mostly_fluent(default_data: DemoData, judge: GoldJudge) -> None:
    settings = DemoSettings()
    qualities = [judge.breakdown(row["completion"]).quality for row in default_data.sft]
    degenerate = sum(quality < 1.0 for quality in qualities) / len(qualities)
    tolerance = binomial_tolerance(settings.degenerate_prob, len(qualities), standard_errors=4)
    assert abs(degenerate - settings.degenerate_prob) < tolerance


def test_responses_are_short_and_use_a_small_vocabulary(default_data: DemoData) -> None:
    lengths = [len(row["completion"].split()) for row in default_data.sft]
    assert 12 <= statistics.median(lengths) <= 40
    assert max(lengths) <= 40
    vocabulary = {word for text in corpus_texts(default_data) for word in words_of(text)}
    assert 100 < len(vocabulary) < 600


def test_preference_pairs_are_not_a_length_contest(default_data: DemoData) -> None:
    fraction = default_data.meta["chosen_longer_fraction"]
    assert 0.35 < fraction < 0.65


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(demo_grammar.SENTIMENTS))
def test_fluent_reviews_are_well_formed(seed: int, sentiment: str) -> None:
    rng = random.Random(seed)
    film = sample_prompt(rng, demo_grammar.TRAIN_TITLES)
    review = fluent_review(rng, film, sentiment)
    assert demo_grammar.REVIEW_WORDS[0] <= len(review.split()) <= demo_grammar.REVIEW_WORDS[1]
    assert review.endswith((".", "!", "?"))
    assert film.title in review
    assert FILM_WORDS & set(words_of(review))
    assert GoldJudge().breakdown(review).quality == 1.0


def test_sentiment_classes_order_by_gold(judge: GoldJudge) -> None:
    rng = random.Random(0)
    means = {}
    for sentiment in demo_grammar.SENTIMENTS:
        reviews = [
            fluent_review(rng, sample_prompt(rng, demo_grammar.TRAIN_TITLES), sentiment)
            for _ in range(200)
        ]
        means[sentiment] = statistics.fmean(judge.score_batch(reviews))
    assert means["positive"] > 0.5 > means["mixed"] > -0.5 > means["negative"]


def test_every_degenerate_kind_is_penalised(judge: GoldJudge) -> None:
    rng = random.Random(1)
    for kind in demo_grammar.DEGENERATE_KINDS:
        for _ in range(50):
            text = demo_grammar.degenerate_review(
                rng, sample_prompt(rng, demo_grammar.TRAIN_TITLES), kind
            )
            assert text.strip()
            assert judge.breakdown(text).quality < 1.0, (kind, text)


def test_scenery_words_carry_no_sentiment() -> None:
    """Titles, genres, plots and off-topic text are outside VADER's lexicon, so gold = opinion."""
    lexicon = SentimentIntensityAnalyzer().lexicon
    scenery = " ".join(
        [
            *demo_grammar.ALL_TITLES,
            *demo_grammar.GENRES,
            *demo_grammar.CHARACTERS,
            *demo_grammar.PLOTS,
            *demo_grammar.ASPECTS,
            *demo_grammar.OFF_TOPIC_SENTENCES,
            *demo_grammar.PROMPT_TEMPLATES,
        ]
    )
    assert not {word for word in words_of(scenery) if word in lexicon}
    assert all(
        word in lexicon
        for word in demo_grammar.POSITIVE_ADJECTIVES + demo_grammar.NEGATIVE_ADJECTIVES
    )


def test_every_aspect_is_a_film_word() -> None:
    assert all(FILM_WORDS & set(words_of(aspect)) for aspect in demo_grammar.ASPECTS)


def test_sample_response_respects_the_degenerate_probability(judge: GoldJudge) -> None:
    rng = random.Random(2)
    film = sample_prompt(rng, demo_grammar.TRAIN_TITLES)
    fluent_only = DemoSettings(degenerate_prob=0.0)
    assert all(
        judge.breakdown(sample_response(rng, film, fluent_only)).quality == 1.0 for _ in range(200)
    )
    all_degenerate = DemoSettings(degenerate_prob=1.0)
    assert all(
        judge.breakdown(sample_response(rng, film, all_degenerate)).quality < 1.0
        for _ in range(200)
    )


# ---------------------------------------------------------------- corpus and settings
def test_corpus_texts_holds_every_prompt_and_response(small_dir: Path) -> None:
    data = generate_demo(SMALL)
    texts = list(corpus_texts(data))
    expected = (
        2 * len(data.sft)
        + 3 * len(data.preferences)
        + (1 + SMALL.ranking_k) * len(data.rankings)
        + len(data.ppo_prompts)
        + len(data.eval_prompts)
    )
    assert len(texts) == expected
    assert data.preferences[0]["rejected"] in texts
    assert prompt_text(data.eval_prompts[-1]) in texts


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"n_sft": 0}, "n_sft"),
        ({"n_preference_prompts": -5}, "n_preference_prompts"),
        ({"n_ranked": -1}, "n_ranked"),
        ({"ranking_k": 1}, "ranking_k"),
        ({"n_eval_prompts": 2.5}, "n_eval_prompts"),
        ({"n_reward_eval_pairs": -1}, "n_reward_eval_pairs"),
        ({"n_annotators": True}, "n_annotators"),
        ({"annotator_temperature": -0.1}, "annotator_temperature"),
        ({"annotator_temperature": float("inf")}, "annotator_temperature"),
        ({"degenerate_prob": 1.5}, "degenerate_prob"),
        ({"positive_prob": 0.7, "negative_prob": 0.6}, "positive_prob"),
        ({"seed": "zero"}, "seed"),
        ({"n_eval_prompts": 10**6}, "n_eval_prompts"),
    ],
)
def test_bad_settings_raise_a_clear_error(overrides: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        DemoSettings(**overrides)


def test_default_generation_takes_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    data = generate_demo(DemoSettings())
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[demo] generate_demo(DemoSettings()) took {seconds:.2f} s; meta: {data.meta}")
    assert data.meta["counts"]["sft"] == DemoSettings().n_sft
