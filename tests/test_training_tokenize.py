"""Chat-formatted training sequences: EOS always in the loss, truncation, padding."""

import pytest

from rlhf_core.models.tokenizer import train_bpe_tokenizer
from rlhf_core.training.tokenize import (
    join_truncated,
    pad_sequences,
    prompt_token_ids,
    tokenize_completion,
)

PROMPT = [{"role": "user", "content": "Review the film."}]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["the film was great and fun", "a dull movie with a bad plot", "Review the film."]
    return train_bpe_tokenizer(corpus * 40, vocab_size=300)


def test_sequence_equals_the_chat_template_of_the_whole_conversation(tokenizer):
    sequence = tokenize_completion(tokenizer, PROMPT, "It was great.", max_length=128)
    whole = tokenizer.apply_chat_template(
        [*PROMPT, {"role": "assistant", "content": "It was great."}], tokenize=False
    )
    assert sequence.input_ids == tokenizer.encode(whole, add_special_tokens=False)
    masked = [t for t, m in zip(sequence.input_ids, sequence.completion_mask, strict=True) if m]
    assert tokenizer.decode(masked) == "It was great.<|end|>"
    assert sequence.prompt_length == len(prompt_token_ids(tokenizer, PROMPT))


def test_eos_stays_in_the_loss_when_pad_equals_eos():
    user_tokenizer = train_bpe_tokenizer(["some text here"] * 20, vocab_size=280)
    user_tokenizer.pad_token = user_tokenizer.eos_token
    sequence = tokenize_completion(user_tokenizer, PROMPT, "ok", max_length=64)
    batch = pad_sequences(
        [sequence, tokenize_completion(user_tokenizer, PROMPT, "", 64)],
        pad_id=user_tokenizer.pad_token_id,
    )
    eos = user_tokenizer.eos_token_id
    last = len(sequence) - 1
    assert sequence.input_ids[last] == eos and sequence.completion_mask[last] == 1
    assert batch["completion_mask"][0, last] == 1
    # Padding with the same id is never in the loss nor attended.
    assert (
        batch["completion_mask"][
            1, len(tokenize_completion(user_tokenizer, PROMPT, "", 64)) :
        ].sum()
        == 0
    )


def test_truncation_drops_the_prompt_start_first():
    prompt, completion = list(range(10)), [100, 101, 102]
    kept = join_truncated(prompt, completion, max_length=8)
    assert kept.input_ids == [5, 6, 7, 8, 9, 100, 101, 102]
    assert kept.completion_mask == [0] * 5 + [1] * 3
    # A very long completion keeps half the budget for the prompt and loses its own end.
    long = join_truncated(prompt, list(range(100, 120)), max_length=8)
    assert long.input_ids == [6, 7, 8, 9, 100, 101, 102, 103] and long.prompt_length == 4
    with pytest.raises(ValueError):
        join_truncated(prompt, completion, max_length=1)


def test_padding_sides():
    a, b = join_truncated([1, 2], [3], 10), join_truncated([1], [3, 4, 5], 10)
    right = pad_sequences([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3, 0], [1, 3, 4, 5]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    left = pad_sequences([a, b], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[0, 1, 2, 3], [1, 3, 4, 5]]
    assert left["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]


def test_truncation_that_cuts_the_eos_is_flagged():
    prompt, completion = [1, 2, 3, 4], [5, 6, 7, 99]  # 99: EOS
    whole = join_truncated(prompt, completion, max_length=8)
    prompt_cut = join_truncated(prompt, [5, 99], max_length=5)  # the prompt start goes first
    end_cut = join_truncated(prompt, completion, max_length=5)  # half the budget stays prompt
    assert not whole.end_cut and not prompt_cut.end_cut
    assert prompt_cut.input_ids == [2, 3, 4, 5, 99]
    assert end_cut.end_cut and end_cut.input_ids == [3, 4, 5, 6, 7]
