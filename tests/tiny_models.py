"""Tiny tokenizers and models the unit tests build in milliseconds."""

import random

from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_core.models.tokenizer import train_bpe_tokenizer

FILM_WORDS = ["the", "film", "was", "great", "dull", "plot", "scene", "actor", "good", "bad"]


def word_tokenizer(words=FILM_WORDS, vocab_size=320):
    """A BPE tokenizer trained on 200 random ten-word sentences of `words` (seed 0)."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(200)]
    return train_bpe_tokenizer(corpus, vocab_size=vocab_size)


def two_layer_llama(vocab_size: int, **overrides) -> LlamaForCausalLM:
    """A 2-layer, 16-wide Llama with `vocab_size` tokens and 64 positions."""
    config = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides}))
