"""Byte-level BPE tokenizer for the demo models; chat template and pad fixes for any tokenizer.

Our tokenizer has a pad token distinct from EOS and a chat template built on its special tokens:

    <|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>

`<|end|>` is the EOS token: it closes every turn, so a policy learns to stop after its answer.
No BOS is added when encoding; `<|bos|>` exists so model configs have a valid `bos_token_id`.
"""

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
ROLE_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# Order fixes the ids: pad = 0, bos = 1, end = 2, system = 3, user = 4, assistant = 5.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# Each message renders as <|role|>content<|end|>; a generation prompt is a bare <|assistant|>.
# The {% generation %} block marks assistant content + <|end|> for
# `apply_chat_template(..., return_assistant_tokens_mask=True)`, so SFT can train on answers only.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown chat role ' + message['role'] + "
    "'; use system, user or assistant.') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# For a user's tokenizer that ships without a template (typically a base model). Plain-text role
# headers, because the user's vocabulary has no role tokens; every turn ends with the tokenizer's
# own EOS so that generation stops after the assistant's answer:
#
#     System:\nYou are terse.</s>User:\nHi!</s>Assistant:\nHello.</s>
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ (message['role'] | capitalize) + ':\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\\n' }}{%- endif -%}"
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it with our special tokens and template.

    The pre-tokenizer and decoder are GPT-2's byte-level ones (every UTF-8 string round-trips,
    so no unknown token is needed), and training is deterministic for the same input. The
    special tokens get ids 0-5 in the order of `SPECIAL_TOKENS`. The vocabulary can come out
    smaller than `vocab_size` when the corpus has too few frequent pairs to merge.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}.")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` `DEFAULT_CHAT_TEMPLATE` if it has no chat template; never overwrite one.

    Mutates and returns `tokenizer`. The default renders each turn as `Role:\\ncontent<eos>`.
    """
    if not tokenizer.chat_template:
        logger.info(
            "Tokenizer has no chat template; using the plain default (Role:\\ncontent<eos>)."
        )
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure `tokenizer` has a pad token, using its EOS token as pad if it has none.

    Mutates and returns `tokenizer`. With pad == eos, padding positions cannot be told apart from
    a real EOS by token id, so downstream code must always mask padding with `attention_mask`,
    never by comparing ids with `pad_token_id`.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has neither a pad token nor an EOS token; set one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}), and resize the model embeddings."
        )
    logger.info("Tokenizer has no pad token; using its EOS token %r as pad.", tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_closes_assistant_turn(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template ends an assistant turn with the tokenizer's EOS.

    Training appends the EOS to every completion and generation stops at it; a template that
    closes a turn with another token (Llama 3 writes `<|eot_id|>`, its EOS is
    `<|end_of_text|>`) would teach the model an ending the template never shows. Checked on a
    one-turn conversation: the rendered prompt, the answer, then the EOS must begin the
    rendering of the whole conversation.
    """
    if tokenizer.eos_token_id is None or not getattr(tokenizer, "chat_template", None):
        return False
    prompt = [{"role": "user", "content": "Hello."}]
    answer = "Hi there."
    opened = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False
    )
    expected = [
        *tokenizer.encode(opened + answer, add_special_tokens=False),
        tokenizer.eos_token_id,
    ]
    return tokenizer.encode(whole, add_special_tokens=False)[: len(expected)] == expected
