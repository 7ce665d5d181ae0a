"""Tests for rlhf_core/data/adapters.py: each common input format becomes the canonical row."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from rlhf_core.data.adapters import AdapterError, adapt_record
from rlhf_core.data.readers import read_records


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


# Literal records in the shapes real data sets use, and the canonical row each must become.
HH_TWO_TURNS = {
    "chosen": (
        "\n\nHuman: How do I make a cup of tea?"
        "\n\nAssistant: Boil water, then steep the tea bag for three minutes."
        "\n\nHuman: Should I add milk?"
        "\n\nAssistant: That is up to your taste; many people do."
    ),
    "rejected": (
        "\n\nHuman: How do I make a cup of tea?"
        "\n\nAssistant: Boil water, then steep the tea bag for three minutes."
        "\n\nHuman: Should I add milk?"
        "\n\nAssistant: No."
    ),
}
HH_TWO_TURNS_CANONICAL = {
    "prompt": [
        user("How do I make a cup of tea?"),
        assistant("Boil water, then steep the tea bag for three minutes."),
        user("Should I add milk?"),
    ],
    "chosen": "That is up to your taste; many people do.",
    "rejected": "No.",
}

REAL_FORMAT_CASES = {
    "canonical_string_prompt": (
        "preference",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 0.5, "source": "demo"},
        {"prompt": [user("2+2?")], "chosen": "4", "rejected": "5", "margin": 0.5, "source": "demo"},
    ),
    "trl_standard_preference": (
        "preference",
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": [user("The sky is")], "chosen": " blue.", "rejected": " green."},
    ),
    "trl_conversational_preference": (
        "preference",
        {
            "prompt": [system("Be brief."), user("What color is the sky?")],
            "chosen": [assistant("It is blue.")],
            "rejected": [assistant("It is green.")],
        },
        {
            "prompt": [system("Be brief."), user("What color is the sky?")],
            "chosen": "It is blue.",
            "rejected": "It is green.",
        },
    ),
    "trl_implicit_prompt_preference": (
        "preference",
        {
            "chosen": [user("What color is the sky?"), assistant("It is blue.")],
            "rejected": [user("What color is the sky?"), assistant("It is green.")],
        },
        {
            "prompt": [user("What color is the sky?")],
            "chosen": "It is blue.",
            "rejected": "It is green.",
        },
    ),
    "hh_rlhf_two_turns": ("preference", HH_TWO_TURNS, HH_TWO_TURNS_CANONICAL),
    "trl_prompt_completion_sft": (
        "sft",
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [user("The sky is")], "completion": " blue."},
    ),
    "trl_conversational_prompt_completion_sft": (
        "sft",
        {"prompt": [user("What color is the sky?")], "completion": [assistant("It is blue.")]},
        {"prompt": [user("What color is the sky?")], "completion": "It is blue."},
    ),
    "trl_text_only_sft": (
        "sft",
        {"text": "The sky is blue."},
        {"prompt": [], "completion": "The sky is blue."},
    ),
    "sft_messages": (
        "sft",
        {
            "messages": [
                system("You are a helpful assistant."),
                user("Hi"),
                assistant("Hello! How can I help?"),
                user("Name a fruit."),
                assistant("Apple."),
            ]
        },
        {
            "prompt": [
                system("You are a helpful assistant."),
                user("Hi"),
                assistant("Hello! How can I help?"),
                user("Name a fruit."),
            ],
            "completion": "Apple.",
        },
    ),
    "ranked_strings": (
        "ranked",
        {"prompt": "Name a colour.", "responses": ["Blue.", "A colour.", "No."]},
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "A colour.", "No."]},
    ),
    "ranked_assistant_messages": (
        "ranked",
        {
            "prompt": [user("Name a colour.")],
            "responses": [[assistant("Blue.")], [assistant("No.")]],
        },
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "No."]},
    ),
    "ranked_completions_and_ranking": (
        "ranked",
        {
            "prompt": "Name a colour.",
            "completions": ["No.", "Blue.", "A colour."],
            "ranking": [1, 2, 0],
        },
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "A colour.", "No."]},
    ),
    "prompts_with_meta": (
        "prompts",
        {"prompt": "Write a haiku.", "meta": {"topic": "poems"}},
        {"prompt": [user("Write a haiku.")], "meta": {"topic": "poems"}},
    ),
    "prompts_from_hh_pair": (
        "prompts",
        HH_TWO_TURNS,
        {"prompt": HH_TWO_TURNS_CANONICAL["prompt"]},
    ),
}


@pytest.mark.parametrize("case", sorted(REAL_FORMAT_CASES))
def test_real_format_record_becomes_canonical(case: str) -> None:
    kind, record, expected = REAL_FORMAT_CASES[case]
    assert adapt_record(record, kind) == expected


@pytest.mark.parametrize("case", sorted(REAL_FORMAT_CASES))
def test_real_format_record_round_trips_through_a_jsonl_file(case: str, tmp_path: Path) -> None:
    kind, record, expected = REAL_FORMAT_CASES[case]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    result = read_records([path], kind)
    assert len(result.rejected) == 0
    (row,) = result.frame.to_dict(orient="records")
    assert {field: row[field] for field in expected} == expected
    assert row["source_line"] == 1


def test_hh_transcript_without_leading_blank_line() -> None:
    record = {
        "chosen": "Human: Hi there\n\nAssistant: Hello!",
        "rejected": "Human: Hi there\n\nAssistant: Go away.",
    }
    assert adapt_record(record, "preference") == {
        "prompt": [user("Hi there")],
        "chosen": "Hello!",
        "rejected": "Go away.",
    }


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        pytest.param(  # an empty final assistant turn becomes an empty response
            "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
            "\n\nHuman: Tell me a joke.\n\nAssistant:",
            ("Tell me a joke.", "Why did the chicken cross the road?", ""),
            id="empty-final-turn",
        ),
        pytest.param(  # only the single leading space after a speaker tag is stripped
            "\n\nHuman:   indented\n\nAssistant:  two spaces",
            "\n\nHuman:   indented\n\nAssistant: one space",
            ("  indented", " two spaces", "one space"),
            id="one-leading-space",
        ),
    ],
)
def test_hh_transcript_edge_cases(chosen: str, rejected: str, expected: tuple) -> None:
    row = adapt_record({"chosen": chosen, "rejected": rejected}, "preference")
    prompt, chosen_response, rejected_response = expected
    assert row["prompt"] == [user(prompt)]
    assert (row["chosen"], row["rejected"]) == (chosen_response, rejected_response)


def test_hh_dialogues_that_differ_before_the_last_turn_are_rejected() -> None:
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Ciao",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Howdy\n\nHuman: Bye\n\nAssistant: Later",
    }
    with pytest.raises(AdapterError) as caught:
        adapt_record(record, "preference")
    assert caught.value.reason == "hh_prefix_mismatch"
    # The first difference is inside the second turn (the first assistant reply).
    assert "turn 2" in caught.value.detail
    assert "'ello" in caught.value.detail and "'owdy" in caught.value.detail


@pytest.mark.parametrize(
    "record",
    [
        # two messages in a conversational response
        {
            "prompt": [user("Hi")],
            "chosen": [user("Hi"), assistant("Yo")],
            "rejected": [assistant("No")],
        },
        # a response message that is not the assistant's
        {"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [user("No")]},
        # implicit prompt whose final turn is not the assistant's
        {"chosen": [user("Hi"), assistant("Yo")], "rejected": [assistant("Yo"), user("Hi")]},
        # implicit prompt whose histories differ
        {"chosen": [user("Hi"), assistant("Yo")], "rejected": [user("Hello"), assistant("No")]},
    ],
)
def test_unconvertible_conversational_preference_is_unrecognised_shape(record: dict) -> None:
    with pytest.raises(AdapterError) as caught:
        adapt_record(record, "preference")
    assert caught.value.reason == "unrecognised_shape"
    assert caught.value.detail


def test_messages_ending_with_a_user_turn_is_unrecognised_shape() -> None:
    with pytest.raises(AdapterError) as caught:
        adapt_record({"messages": [user("Hi"), assistant("Yo"), user("Bye")]}, "sft")
    assert caught.value.reason == "unrecognised_shape"
    assert "'user'" in caught.value.detail


@pytest.mark.parametrize("ranking", [[0, 0, 1], [1, 2, 3], [0, 1], ["0", "1", "2"]])
def test_ranking_that_is_not_a_permutation_is_unrecognised_shape(ranking: list) -> None:
    record = {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": ranking}
    with pytest.raises(AdapterError) as caught:
        adapt_record(record, "ranked")
    assert caught.value.reason == "unrecognised_shape"


def test_optional_fields_pass_through_and_unknown_fields_are_dropped() -> None:
    record = {
        "prompt": "Q",
        "chosen": "a",
        "rejected": "b",
        "margin": 2.0,
        "source": "vendor-1",
        "annotator": "ann-7",
        "created_at": "2026-01-02T03:04:05Z",
        "split": "validation",
        "worker_id": 12345,
        "meta": {"not": "a preference field"},
    }
    assert adapt_record(record, "preference") == {
        "prompt": [user("Q")],
        "chosen": "a",
        "rejected": "b",
        "margin": 2.0,
        "source": "vendor-1",
        "annotator": "ann-7",
        "created_at": "2026-01-02T03:04:05Z",
        "split": "eval",
    }


def test_datetime_created_at_becomes_iso_text() -> None:
    created = datetime.datetime(2026, 5, 17, 8, 30, tzinfo=datetime.UTC)
    row = adapt_record(
        {"prompt": "Q", "chosen": "a", "rejected": "b", "created_at": created}, "preference"
    )
    assert row["created_at"] == "2026-05-17T08:30:00+00:00"


def test_values_are_not_cleaned_or_type_checked() -> None:
    row = adapt_record({"prompt": "", "chosen": 7, "rejected": "", "margin": "high"}, "preference")
    assert row == {"prompt": [user("")], "chosen": 7, "rejected": "", "margin": "high"}


def test_missing_required_fields_become_none() -> None:
    assert adapt_record({"prompt": "Q", "chosen": "a"}, "preference") == {
        "prompt": [user("Q")],
        "chosen": "a",
        "rejected": None,
    }
    assert adapt_record({"unrelated": 1}, "ranked") == {"prompt": None, "responses": None}


def test_message_extra_keys_are_dropped() -> None:
    record = {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}], "completion": "Yo"}
    assert adapt_record(record, "sft")["prompt"] == [user("Hi")]


def test_prompts_from_an_sft_conversation() -> None:
    record = {"messages": [user("Hi"), assistant("Yo"), user("Bye"), assistant("Ciao")]}
    assert adapt_record(record, "prompts") == {"prompt": [user("Hi"), assistant("Yo"), user("Bye")]}


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown data kind 'pairs'"):
        adapt_record({"prompt": "Q"}, "pairs")


@pytest.mark.parametrize(
    "chosen",
    [
        "Preamble\n\nHuman: Hi\n\nAssistant: Yo",  # text before the first turn
        "\n\nAssistant: Human: Yo",  # no human turn before the reply
    ],
)
def test_hh_transcript_that_cannot_be_split_is_unrecognised_shape(chosen: str) -> None:
    record = {"chosen": chosen, "rejected": chosen.replace("Yo", "No")}
    with pytest.raises(AdapterError) as caught:
        adapt_record(record, "preference")
    assert caught.value.reason == "unrecognised_shape"


def test_a_rejection_sentence_shows_a_huge_value_cut_short() -> None:
    """repr() of an integer over 4300 digits raises ValueError, and a megabyte role would make
    a megabyte sentence: both are shown cut down, and the record is still one rejection."""
    with pytest.raises(AdapterError) as huge_index:
        adapt_record({"prompt": "Q", "completions": ["a", "b"], "ranking": [10**5000, 0]}, "ranked")
    assert "too large to show" in huge_index.value.detail
    long_role = [{"role": "x" * 1_000_000, "content": "hi"}]
    with pytest.raises(AdapterError) as long_one:
        adapt_record({"prompt": "Q", "completion": long_role}, "sft")
    assert len(long_one.value.detail) < 200 and "xxx..." in long_one.value.detail
