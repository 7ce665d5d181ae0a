"""Tests for rlhf_core/models/tokenizer.py: BPE training, chat template, pad/template fixes."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_core.models.tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    ensure_chat_template,
    ensure_pad_token,
    train_bpe_tokenizer,
)

VOCAB_SIZE = 400


def synthetic_corpus(num_sentences: int = 300, seed: int = 0) -> list[str]:
    """Short review-like sentences with some accented words and emoji."""
    rng = random.Random(seed)
    subjects = ["the film", "this movie", "the plot", "our hero", "the café scene", "the cast"]
    verbs = ["was", "felt", "seemed", "became", "is"]
    adjectives = ["great", "terrible", "boring", "wonderful", "naïve", "tense", "fun 🎬"]
    return [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(adjectives)}, "
        f"and {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(adjectives)}."
        for _ in range(num_sentences)
    ]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(synthetic_corpus(), vocab_size=VOCAB_SIZE)


def test_special_tokens_have_fixed_distinct_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_vocab_size_is_bounded_and_merges_were_learned(tokenizer):
    assert 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= VOCAB_SIZE
    # a frequent word is one token, not a byte sequence
    assert len(tokenizer(" movie", add_special_tokens=False)["input_ids"]) == 1


def test_too_small_vocab_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_special_tokens_are_single_ids_inside_text(tokenizer):
    ids = tokenizer("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in ids  # no BOS is added when encoding


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=80))
def test_any_unicode_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_chat_template_renders_exact_string_with_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Rate the film."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>Be brief.<|end|><|user|>Rate the film.<|end|><|assistant|>"


def test_chat_template_renders_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "It was great."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|user|>Hi<|end|><|assistant|>It was great.<|end|>"


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="Unknown chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_answer_and_end_token_only(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "It was great."},
    ]
    encoded = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    answer_ids = [i for i, m in zip(ids, mask, strict=True) if m == 1]
    assert tokenizer.decode(answer_ids) == "It was great.<|end|>"
    prompt_ids = [i for i, m in zip(ids, mask, strict=True) if m == 0]
    assert tokenizer.decode(prompt_ids) == "<|user|>Hi<|end|><|assistant|>"


def test_skip_special_tokens_gives_clean_text(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Rate it."},
        {"role": "assistant", "content": "Great fun."},
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Be brief.Rate it.Great fun."


def test_training_is_deterministic():
    first = train_bpe_tokenizer(synthetic_corpus(seed=3), vocab_size=VOCAB_SIZE)
    second = train_bpe_tokenizer(synthetic_corpus(seed=3), vocab_size=VOCAB_SIZE)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    other = train_bpe_tokenizer(synthetic_corpus(seed=4, num_sentences=50), vocab_size=VOCAB_SIZE)
    assert other.get_vocab() != first.get_vocab()


def test_save_and_reload_keeps_template_and_special_tokens(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    for name in ("pad_token", "bos_token", "eos_token"):
        assert getattr(reloaded, name) == getattr(tokenizer, name)
    assert set(reloaded.all_special_tokens) == set(SPECIAL_TOKENS)
    text = "<|user|>The café scene was naïve 🎬<|end|><|assistant|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def user_tokenizer_without_pad_or_template(tokenizer) -> PreTrainedTokenizerFast:
    """A tokenizer like many base models ship: EOS only, no pad, no chat template."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def test_ensure_chat_template_assigns_plain_default(tokenizer):
    user_tokenizer = user_tokenizer_without_pad_or_template(tokenizer)
    assert not user_tokenizer.chat_template
    returned = ensure_chat_template(user_tokenizer)
    assert returned is user_tokenizer
    assert user_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Rate it."},
    ]
    rendered = user_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "System:\nBe brief.<|end|>User:\nHi<|end|>Assistant:\nHello.<|end|>"
        "User:\nRate it.<|end|>Assistant:\n"
    )


def test_ensure_chat_template_never_overwrites(tokenizer):
    user_tokenizer = user_tokenizer_without_pad_or_template(tokenizer)
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    user_tokenizer.chat_template = custom
    ensure_chat_template(user_tokenizer)
    assert user_tokenizer.chat_template == custom
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_ensure_pad_token_uses_eos_when_missing(tokenizer):
    user_tokenizer = user_tokenizer_without_pad_or_template(tokenizer)
    assert user_tokenizer.pad_token is None
    ensure_pad_token(user_tokenizer)
    assert user_tokenizer.pad_token == user_tokenizer.eos_token
    assert user_tokenizer.pad_token_id == user_tokenizer.eos_token_id
    batch = user_tokenizer(["a", "the film was great"], padding=True)
    assert batch["input_ids"][0][-1] == user_tokenizer.eos_token_id
    assert batch["attention_mask"][0][-1] == 0


def test_ensure_pad_token_keeps_existing_pad(tokenizer):
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|pad|>"


def test_ensure_pad_token_without_eos_raises(tokenizer):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bare = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        ensure_pad_token(bare)
