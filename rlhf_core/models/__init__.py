"""Models: tiny demo models, tokenizers, loading, value and reward heads."""

from rlhf_core.models.heads import (
    PolicyWithValueHead,
    RewardModel,
    last_token_index,
    position_ids_from_mask,
)
from rlhf_core.models.loading import load_causal_lm, load_tokenizer, save_model
from rlhf_core.models.tiny import TINY_CONFIGS, build_tiny_llama, count_parameters
from rlhf_core.models.tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_CHAT_TEMPLATE,
    ensure_chat_template,
    ensure_pad_token,
    train_bpe_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_CHAT_TEMPLATE",
    "TINY_CONFIGS",
    "PolicyWithValueHead",
    "RewardModel",
    "build_tiny_llama",
    "count_parameters",
    "ensure_chat_template",
    "ensure_pad_token",
    "last_token_index",
    "load_causal_lm",
    "load_tokenizer",
    "position_ids_from_mask",
    "save_model",
    "train_bpe_tokenizer",
]
