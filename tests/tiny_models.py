"""Tiny tokenizers and models the unit tests build in milliseconds."""

import random

from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_core.models.loading import load_causal_lm
from rlhf_core.models.tokenizer import train_bpe_tokenizer
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import load_validated, train_eval_split

# The smallest PPO run that exercises every part: 8 responses of at most 6 tokens, one epoch
# of minibatches of 4, a high learning rate so a few iterations move the policy.
TINY_PPO_TRAIN = dict(
    rollout_batch_size=8,
    max_new_tokens=6,
    minibatch_size=4,
    ppo_epochs=1,
    learning_rate=1e-2,
    warmup_steps=0,
)
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


def model_and_split(project, model: str, set_name: str, eval_fraction: float):
    """A prepared project's `model` ("base" or "sft") with its tokenizer, and the train and
    held-out rows of its validated `set_name`."""
    paths = ProjectPaths(project)
    model_dir = {"base": paths.base_model_dir, "sft": paths.sft_model_dir}[model]
    causal_lm, tokenizer = load_causal_lm(str(model_dir))
    train_rows, held_out = train_eval_split(load_validated(paths, set_name), eval_fraction)
    return causal_lm, tokenizer, train_rows, held_out


def chatty_policy(folder, *, positions: int, exchanges: int, words: int, steps: int) -> float:
    """Train a `two_layer_llama` with `word_tokenizer`'s chat template on `exchanges` random
    film-word exchanges (`words` words a sentence) for `steps` AdamW steps, so that it answers
    in words and ends its answers as a policy does; save it to `folder` as save_pretrained
    writes it. Returns the last training loss (a uniform guess over 303 tokens: 5.7)."""
    import torch

    from rlhf_core.models.loading import save_model

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = two_layer_llama(len(tokenizer), max_position_embeddings=positions)
    rng = random.Random(1)

    def sentence():
        return " ".join(rng.choice(FILM_WORDS) for _ in range(words)) + "."

    chats = [
        [{"role": "user", "content": sentence()}, {"role": "assistant", "content": sentence()}]
        for _ in range(exchanges)
    ]
    rows = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    batch = tokenizer(rows, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (chats, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(model, tokenizer, folder)
    return loss.item()
