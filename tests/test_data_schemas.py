"""Tests for rlhf_core/data/schemas.py: field tables, canonical JSON and content hashes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.data.schemas import (
    KINDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    canonical_json,
    canonical_split_name,
    content_hash,
    prompt_key,
)

PREFERENCE_ROW = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü"}],
    "chosen": "Hello!",
    "rejected": "Go away.",
    "margin": 1.5,
    "source": "vendor-a",
    "annotator": "ann-1",
    "created_at": "2026-01-02T03:04:05Z",
}


def reversed_keys(value):
    """The same data with every dict's keys in reverse insertion order."""
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_keys(item) for item in value]
    return value


def test_field_tables_cover_every_kind_and_keep_split_and_provenance_out() -> None:
    assert KINDS == ("sft", "preference", "ranked", "prompts")
    assert set(REQUIRED_FIELDS) == set(OPTIONAL_FIELDS) == set(KINDS)
    for kind in KINDS:
        assert REQUIRED_FIELDS[kind][0] == "prompt"
        assert not set(REQUIRED_FIELDS[kind]) & set(OPTIONAL_FIELDS[kind])
        fields = set(REQUIRED_FIELDS[kind]) | set(OPTIONAL_FIELDS[kind])
        assert not fields & {"split", "source_file", "source_line"}


def test_canonical_json_sorts_keys_drops_whitespace_and_keeps_non_ascii() -> None:
    value = {"b": 1, "a": ["é", {"d": 2.5, "c": None}], "🙂": True}
    assert canonical_json(value) == '{"a":["é",{"c":null,"d":2.5}],"b":1,"🙂":true}'


def test_canonical_json_turns_numpy_values_into_plain_json() -> None:
    assert canonical_json({"a": np.array([1, 2]), "b": np.float64(0.5)}) == '{"a":[1,2],"b":0.5}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=50, deadline=None)
@given(value=json_values)
def test_canonical_json_is_independent_of_key_order_and_parses_back(value) -> None:
    text = canonical_json(value)
    assert canonical_json(reversed_keys(value)) == text
    assert json.loads(text) == value


def test_content_hash_is_the_sha256_of_the_kinds_fields() -> None:
    expected_text = json.dumps(
        PREFERENCE_ROW, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    expected = hashlib.sha256(expected_text.encode("utf-8")).hexdigest()
    assert content_hash(PREFERENCE_ROW, "preference") == expected


@settings(max_examples=30, deadline=None)
@given(
    source_file=st.text(max_size=20),
    source_line=st.integers(min_value=1),
    split=st.sampled_from([None, "train", "eval"]),
    extra=st.dictionaries(st.sampled_from(["id", "worker", "notes"]), st.text(max_size=5)),
)
def test_content_hash_ignores_provenance_split_extras_and_key_order(
    source_file: str, source_line: int, split: str | None, extra: dict
) -> None:
    row = {
        **reversed_keys(PREFERENCE_ROW),
        **extra,
        "source_file": source_file,
        "source_line": source_line,
        "split": split,
    }
    assert content_hash(row, "preference") == content_hash(PREFERENCE_ROW, "preference")


@pytest.mark.parametrize(
    ("field", "new_value"),
    [
        ("chosen", "Hello"),
        ("rejected", "Go away!"),
        ("margin", 1.0),
        ("annotator", "ann-2"),
        ("prompt", [{"role": "user", "content": "Hi ü"}]),
    ],
)
def test_content_hash_changes_with_any_content_field(field: str, new_value) -> None:
    changed = {**PREFERENCE_ROW, field: new_value}
    assert content_hash(changed, "preference") != content_hash(PREFERENCE_ROW, "preference")


def test_absent_none_and_nan_optional_fields_hash_alike() -> None:
    row = {key: PREFERENCE_ROW[key] for key in ("prompt", "chosen", "rejected")}
    absent = content_hash(row, "preference")
    assert content_hash({**row, "margin": None}, "preference") == absent
    assert content_hash({**row, "margin": float("nan")}, "preference") == absent


def test_numpy_arrays_from_parquet_hash_like_lists() -> None:
    row = {"prompt": [{"role": "user", "content": "Q"}], "responses": ["a", "b"]}
    as_arrays = {"prompt": np.array(row["prompt"], dtype=object), "responses": np.array(["a", "b"])}
    assert content_hash(as_arrays, "ranked") == content_hash(row, "ranked")


def test_content_hash_of_an_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown data kind 'pairs'"):
        content_hash(PREFERENCE_ROW, "pairs")


def test_prompt_key_is_the_sha256_of_the_canonical_prompt() -> None:
    prompt = PREFERENCE_ROW["prompt"]
    expected_text = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert prompt_key(prompt) == hashlib.sha256(expected_text.encode("utf-8")).hexdigest()
    assert prompt_key(reversed_keys(prompt)) == prompt_key(prompt)


def test_prompt_key_of_a_string_is_that_of_one_user_message() -> None:
    assert prompt_key("Hi") == prompt_key([{"role": "user", "content": "Hi"}])
    assert prompt_key("Hi") != prompt_key([{"role": "system", "content": "Hi"}])
    assert prompt_key("Hi") != prompt_key("Hi ")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train", "train"),
        ("TRAIN", "train"),
        ("validation", "eval"),
        ("test", "eval"),
        ("eval", "eval"),
        ("test_prefs", "eval"),
        ("train_sft", "train"),
        ("holdout", None),
        (None, None),
    ],
)
def test_canonical_split_name(name, expected) -> None:
    assert canonical_split_name(name) == expected
