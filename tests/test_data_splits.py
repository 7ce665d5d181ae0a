"""Tests for rlhf_core/data/splits.py: stable, order-free train/eval assignment by prompt."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.data.splits import assign_split, split_frame, split_position


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def frame_of(prompts: list[str], splits: list | None = None) -> pd.DataFrame:
    data = {
        "prompt": pd.Series([[user(text)] for text in prompts], dtype=object),
        "completion": pd.Series([f"reply to {text}" for text in prompts], dtype=object),
    }
    if splits is not None:
        data["split"] = pd.Series(splits, dtype=object)
    return pd.DataFrame(data)


def split_by_prompt(train: pd.DataFrame, eval_: pd.DataFrame) -> dict[str, str]:
    labels = {}
    for part, name in ((train, "train"), (eval_, "eval")):
        for prompt in part["prompt"]:
            labels[prompt[0]["content"]] = name
    return labels


def test_split_position_is_the_first_eight_bytes_of_the_salted_prompt_hash() -> None:
    prompt = [{"role": "system", "content": "Be kind."}, user("Hi ünïcödé")]
    canonical = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    digest = hashlib.sha256((key + "salt-1").encode("utf-8")).hexdigest()
    assert split_position(prompt, "salt-1") == int(digest[:16], 16) / 2**64


def test_string_prompt_splits_like_its_single_user_message() -> None:
    for index in range(50):
        text = f"prompt number {index}"
        assert assign_split(text, 0.5) == assign_split([user(text)], 0.5)


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.text(max_size=30), min_size=1, max_size=30, unique=True),
    later=st.lists(st.text(max_size=30), max_size=30),
    order_seed=st.randoms(use_true_random=False),
    eval_fraction=st.floats(min_value=0.0, max_value=1.0),
    salt=st.text(max_size=8),
)
def test_same_prompt_same_split_whatever_the_order_and_later_rows(
    prompts: list[str], later: list[str], order_seed, eval_fraction: float, salt: str
) -> None:
    before = split_by_prompt(*split_frame(frame_of(prompts), eval_fraction, salt))
    grown = prompts + later
    order_seed.shuffle(grown)
    after = split_by_prompt(*split_frame(frame_of(grown), eval_fraction, salt))
    assert {prompt: after[prompt] for prompt in prompts} == before
    assert before == {prompt: assign_split(prompt, eval_fraction, salt) for prompt in prompts}


def test_eval_fraction_is_respected_on_ten_thousand_prompts() -> None:
    prompts = [f"synthetic prompt {index}: what is {index} squared?" for index in range(10_000)]
    train, eval_ = split_frame(frame_of(prompts), 0.1)
    assert len(train) + len(eval_) == 10_000
    # The binomial standard deviation is 0.003; allow five of them.
    assert abs(len(eval_) / 10_000 - 0.1) < 0.015


def test_raising_the_fraction_only_moves_prompts_into_eval() -> None:
    prompts = [f"p{index}" for index in range(500)]
    small = {prompt for prompt in prompts if assign_split(prompt, 0.1) == "eval"}
    large = {prompt for prompt in prompts if assign_split(prompt, 0.3) == "eval"}
    assert small < large


def test_a_different_salt_gives_a_different_split() -> None:
    prompts = [f"p{index}" for index in range(200)]
    plain = [assign_split(prompt, 0.5) for prompt in prompts]
    salted = [assign_split(prompt, 0.5, salt="run-2") for prompt in prompts]
    assert plain != salted


@pytest.mark.parametrize(("eval_fraction", "expected"), [(0.0, "train"), (1.0, "eval")])
def test_fraction_zero_and_one(eval_fraction: float, expected: str) -> None:
    assert {assign_split(f"p{index}", eval_fraction) for index in range(100)} == {expected}


@pytest.mark.parametrize("eval_fraction", [-0.1, 1.5, float("nan"), True])
def test_invalid_fraction_is_a_clear_error(eval_fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction must be a number in"):
        assign_split("p", eval_fraction)
    with pytest.raises(ValueError, match="eval_fraction must be a number in"):
        split_frame(frame_of(["p"]), eval_fraction)


def test_rows_sharing_a_prompt_share_a_split() -> None:
    prompts = [f"p{index % 20}" for index in range(200)]
    train, eval_ = split_frame(frame_of(prompts), 0.5)
    train_prompts = {prompt[0]["content"] for prompt in train["prompt"]}
    eval_prompts = {prompt[0]["content"] for prompt in eval_["prompt"]}
    assert train_prompts and eval_prompts
    assert not train_prompts & eval_prompts


def test_split_frame_keeps_given_splits_and_fills_the_rest() -> None:
    prompts = [f"p{index}" for index in range(40)]
    given_splits = ["eval", "train"] + [None] * 37 + [float("nan")]
    frame = frame_of(prompts, given_splits)
    train, eval_ = split_frame(frame, 0.5)
    labels = {**dict.fromkeys(train.index, "train"), **dict.fromkeys(eval_.index, "eval")}
    assert sorted(labels) == list(frame.index)
    assert labels[0] == "eval" and labels[1] == "train"
    for index in range(2, 40):
        assert labels[index] == assign_split(prompts[index], 0.5)
    assert list(train["split"]) == ["train"] * len(train)
    assert list(eval_["split"]) == ["eval"] * len(eval_)
    assert frame["split"].iloc[2] is None  # the input frame is not modified


def test_split_frame_rejects_an_unknown_split_value() -> None:
    with pytest.raises(ValueError, match="split value 'holdout' is not 'train' or 'eval'"):
        split_frame(frame_of(["a", "b"], ["train", "holdout"]), 0.5)


def test_split_frame_needs_a_prompt_column() -> None:
    with pytest.raises(ValueError, match="no 'prompt' column"):
        split_frame(pd.DataFrame({"completion": ["x"]}), 0.5)
