"""Small Llama-architecture models built from scratch, for tests, the demo and benchmarks."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TinyLlamaShape:
    """The size of a tiny Llama; everything else (vocab, special ids) comes from the tokenizer."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


# intermediate_size follows Llama's ~8/3 * hidden ratio where the brief leaves it free.
TINY_CONFIGS: dict[str, TinyLlamaShape] = {
    # unit tests: a forward pass is a fraction of a millisecond
    "nano": TinyLlamaShape(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    ),
    # end-to-end tests of the demo stages
    "micro": TinyLlamaShape(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172
    ),
    # the embedded demo: trains in minutes on 2 CPU cores
    "demo": TinyLlamaShape(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344
    ),
    # benchmarks: big enough that matmuls, not Python overhead, dominate; untied like larger models
    "bench": TinyLlamaShape(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=1376,
        tie_word_embeddings=False,
    ),
}


def tiny_llama_config(config_name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """`LlamaConfig` for `TINY_CONFIGS[config_name]`, vocab and special ids from `tokenizer`."""
    if config_name not in TINY_CONFIGS:
        raise ValueError(
            f"Unknown tiny model config {config_name!r}; choose one of {sorted(TINY_CONFIGS)}."
        )
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer needs a pad and an EOS token to build a model; "
            "call ensure_pad_token(tokenizer) first."
        )
    shape = TINY_CONFIGS[config_name]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_llama(
    config_name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> LlamaForCausalLM:
    """A freshly initialised float32 `LlamaForCausalLM` of the named size.

    Weights depend only on `seed` (same seed -> identical state_dict); the global torch RNG is
    left untouched. Unknown `config_name` raises ValueError listing the known ones.
    """
    config = tiny_llama_config(config_name, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in `model` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
