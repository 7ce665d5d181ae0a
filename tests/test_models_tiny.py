"""Tests for rlhf_core/models/tiny.py: named tiny Llama configs, seeded builds, parameter counts."""

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from rlhf_core.models.tiny import TINY_CONFIGS, build_tiny_llama, count_parameters
from rlhf_core.models.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    words = ["good", "bad", "movie", "plot", "the", "was", "great", "dull", "actor", "scene"]
    corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    return train_bpe_tokenizer(corpus, vocab_size=320)


def test_named_configs_have_the_documented_sizes():
    assert set(TINY_CONFIGS) >= {"nano", "micro", "demo", "bench"}
    expected = {  # name: (hidden, layers, heads, intermediate or None if free)
        "nano": (32, 2, 2, 64),
        "micro": (64, 2, 4, None),
        "demo": (128, 4, 4, 344),
        "bench": (512, 8, 8, 1376),
    }
    for name, (hidden, layers, heads, intermediate) in expected.items():
        shape = TINY_CONFIGS[name]
        assert (shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads) == (
            hidden,
            layers,
            heads,
        )
        if intermediate is not None:
            assert shape.intermediate_size == intermediate
        assert shape.hidden_size % shape.num_attention_heads == 0
        assert shape.max_position_embeddings >= 512
    for name in ("nano", "micro", "demo"):
        assert TINY_CONFIGS[name].tie_word_embeddings


def test_build_takes_vocab_and_special_ids_from_tokenizer(tokenizer):
    model = build_tiny_llama("nano", tokenizer)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_small_models_tie_input_and_output_embeddings(tokenizer):
    model = build_tiny_llama("nano", tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_forward_gives_finite_logits(tokenizer):
    model = build_tiny_llama("micro", tokenizer)
    ids = torch.tensor([tokenizer("the movie was great")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights(tokenizer):
    first = build_tiny_llama("nano", tokenizer, seed=7).state_dict()
    second = build_tiny_llama("nano", tokenizer, seed=7).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_different_seed_gives_different_weights(tokenizer):
    first = build_tiny_llama("nano", tokenizer, seed=0).state_dict()
    second = build_tiny_llama("nano", tokenizer, seed=1).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[key], second[key])


def test_build_leaves_global_rng_untouched(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama("nano", tokenizer, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_config_name_lists_known_names(tokenizer):
    with pytest.raises(ValueError, match="nano") as excinfo:
        build_tiny_llama("gigantic", tokenizer)
    assert "gigantic" in str(excinfo.value)
    assert "bench" in str(excinfo.value)


def test_count_parameters_matches_llama_formula(tokenizer):
    model = build_tiny_llama("nano", tokenizer)
    vocab, hidden, inter, layers = len(tokenizer), 32, 64, 2
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden  # attn, mlp, 2 norms
    expected = vocab * hidden + layers * per_layer + hidden  # tied embedding + final norm
    assert count_parameters(model) == expected


def test_count_parameters_can_skip_frozen(tokenizer):
    model = build_tiny_llama("nano", tokenizer)
    model.get_input_embeddings().weight.requires_grad_(False)
    frozen = model.get_input_embeddings().weight.numel()
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen
