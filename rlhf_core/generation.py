"""Sample responses from a causal LM for chat prompts, and score them with a reward model.

Shared by PPO rollouts and the evaluation stage. Every function takes its models as arguments
and does no file I/O. Batches are formed from length-sorted examples (less padding) and results
come back in the caller's order.

Token-level conventions:
- A prompt is rendered with the tokenizer's chat template plus the generation prompt (for our
  tokenizer: `<|user|>…<|end|><|assistant|>`); a response is what the model sampled after it,
  cut after its first EOS, which is kept. A response that hit `max_new_tokens` has no EOS.
- Padding is masked with `attention_mask`, never recognised by token id, so a tokenizer whose
  pad token is its EOS token works everywhere here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core.algorithms.logprobs import sequence_logprobs, shift_for_causal_lm
from rlhf_core.config.training import (
    SamplingSettings,
    require_batch_size,
)
from rlhf_core.models.heads import PolicyWithValueHead, position_ids_from_mask

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# Padding is always masked out, so its id never changes a result; 0 is valid in every vocab.
_MASKED_PAD_ID = 0


# --------------------------------------------------------------------------------------------
# Prompts and settings
# --------------------------------------------------------------------------------------------


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages]
) -> list[list[int]]:
    """Token ids of each chat prompt followed by the assistant's generation prompt.

    Renders `apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)` and encodes
    the text with `add_special_tokens=False`: the template already writes every special token
    the model expects (role tokens, `<|end|>`, and a BOS where a model's template has one), so
    letting the tokenizer add its own BOS/EOS would double them. This is also what
    `apply_chat_template(..., tokenize=True)` does internally, so both give the same ids.
    """
    require_chat_template(tokenizer)
    texts = [
        tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]
    return _encode(tokenizer, texts)


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled responses, one row per prompt, in the order the prompts were given.

    Attributes:
        prompt_ids: rendered prompt tokens (see `render_prompts`).
        response_ids: sampled tokens; each ends with EOS when the model ended it, and has
            no EOS (and `max_new_tokens` tokens) when it was cut by the length limit.
        ended: whether each response ended with an EOS.
        texts: responses decoded without special tokens and stripped of surrounding space.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    texts: list[str]

    def __post_init__(self) -> None:
        sizes = {
            "prompt_ids": len(self.prompt_ids),
            "response_ids": len(self.response_ids),
            "ended": len(self.ended),
            "texts": len(self.texts),
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Rollout fields must have one entry per prompt but have {sizes}.")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Sequence[int]) -> Rollout:
        """The rows at `indices`, in that order."""
        return Rollout(
            prompt_ids=[self.prompt_ids[i] for i in indices],
            response_ids=[self.response_ids[i] for i in indices],
            ended=[self.ended[i] for i in indices],
            texts=[self.texts[i] for i in indices],
        )

    def to_padded(self, pad_id: int) -> dict[str, torch.Tensor | int]:
        """Training tensors: each prompt left-padded to a common P, each response right-padded.

        Returns a dict with
            input_ids:      (b, P + R) long, `[pad… prompt | response …pad]`
            attention_mask: (b, P + R) long, 1 on prompt and response tokens
            response_mask:  (b, P + R) long, 1 exactly on response tokens (including the EOS)
            prompt_width:   int P; every response starts at column P.

        Alignment for a causal LM run on `input_ids`: the logits at position t predict the token
        at t + 1, so the response tokens `input_ids[:, P : P + R]` are scored by
        `logits[:, P - 1 : P + R - 1]`, i.e. positions P-1…P+R-2, and the mask for those logits
        is `response_mask[:, P : P + R]` (equivalently `shift_for_causal_lm(logits, input_ids,
        response_mask)`). Use `position_ids_from_mask(attention_mask)` for positions.
        """
        if len(self) == 0:
            raise ValueError("The rollout is empty; there is nothing to pad.")
        prompt_width = max(len(ids) for ids in self.prompt_ids)
        response_width = max(len(ids) for ids in self.response_ids)
        input_rows, attention_rows, response_rows = [], [], []
        for prompt, response in zip(self.prompt_ids, self.response_ids, strict=True):
            left = prompt_width - len(prompt)
            right = response_width - len(response)
            input_rows.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
            attention_rows.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
            response_rows.append([0] * prompt_width + [1] * len(response) + [0] * right)
        return {
            "input_ids": torch.tensor(input_rows, dtype=torch.long),
            "attention_mask": torch.tensor(attention_rows, dtype=torch.long),
            "response_mask": torch.tensor(response_rows, dtype=torch.long),
            "prompt_width": prompt_width,
        }


def truncate_at_eos(
    token_ids: Sequence[int], eos_ids: int | Sequence[int]
) -> tuple[list[int], bool]:
    """`(tokens up to and including the first end-of-turn token, whether there was one)`.

    `eos_ids` is one id or several (`end_token_ids`). Everything after the first of them
    (padding, or more EOS when pad == EOS) is dropped.
    """
    ends = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    tokens = list(token_ids)
    for position, token in enumerate(tokens):
        if token in ends:
            return tokens[: position + 1], True
    return tokens, False


def end_token_ids(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS first, then the model's
    `generation_config.eos_token_id` (one id or a list: Llama 3 ends a turn with
    `<|eot_id|>`, not its EOS), without repeats."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    if extra is not None:
        ids += [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def derived_seed(seed: int, stream: str, index: int = 0) -> int:
    """A seed for one random stream of a run (`stream`, `index`), independent of the others.

    The first 8 bytes of sha256(f"{seed}/{stream}/{index}"), as a non-negative int63.
    """
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generate(
    model: PreTrainedModel | PolicyWithValueHead,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    settings: SamplingSettings | None = None,
    seed: int = 0,
    *,
    progress: bool = False,
) -> Rollout:
    """Sample one response per chat prompt.

    Prompts are rendered with `render_prompts`, sorted by length, left-padded in batches of
    `settings.batch_size` and passed to `model.generate` (KV cache on) under
    `torch.inference_mode()` with the model in eval mode (each module's train/eval mode is
    restored afterwards). Sampling draws from torch's global RNG, seeded with `seed` inside
    `torch.random.fork_rng()`: the same seed and batch size give the same samples, and the
    caller's RNG state is left as it was. Each response is cut after its first end token:
    the tokenizer's EOS or any id of the model's `generation_config.eos_token_id`.

    The sampling distribution is fixed by `settings` alone: the model's own
    `generation_config` defaults for temperature, top-k/p, repetition penalties and minimum
    lengths are overridden (token suppression lists and `min_p` from it would still apply).

    Args:
        model: a causal LM, or a `PolicyWithValueHead` (its `.lm` samples).
        tokenizer: with a chat template, a pad token and an EOS token (pad may equal EOS).
        prompts: chat prompts, each a list of `{"role", "content"}` messages.
        settings: sampling settings; `SamplingSettings()` by default.
        seed: seeds the sampling.
        progress: show a progress bar over batches.

    Returns:
        A `Rollout` in the order of `prompts`.
    """
    settings = settings or SamplingSettings()
    pad_id, _ = pad_and_eos_ids(tokenizer)
    lm = model.lm if isinstance(model, PolicyWithValueHead) else model
    eos_ids = end_token_ids(tokenizer, lm)
    prompt_ids = render_prompts(tokenizer, prompts)
    generation_config = _generation_config(settings, pad_id, eos_ids)
    device = device_of(lm)
    batches = list(length_sorted_batches([len(ids) for ids in prompt_ids], settings.batch_size))
    responses: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    with eval_mode(model), torch.inference_mode(), _forked_rng(device):
        torch.manual_seed(seed)
        for batch in _maybe_track(batches, progress, "Generating"):
            input_ids, attention_mask = pad_batch([prompt_ids[i] for i in batch], pad_id, "left")
            sequences = lm.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
            )  # (batch, P + new tokens)
            new_tokens = sequences[:, input_ids.shape[1] :].tolist()
            for index, tokens in zip(batch, new_tokens, strict=True):
                responses[index], ended[index] = truncate_at_eos(tokens, eos_ids)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in responses]
    return Rollout(prompt_ids=prompt_ids, response_ids=responses, ended=ended, texts=texts)


def _generation_config(
    settings: SamplingSettings, pad_id: int, eos_ids: list[int]
) -> GenerationConfig:
    """A generation config pinning the common knobs that shape the next-token distribution;
    generation stops at any of `eos_ids`."""
    common = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "pad_token_id": pad_id,
        "eos_token_id": eos_ids,
        "use_cache": True,
    }
    if not settings.do_sample:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        **common,
    )


# --------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------


def sequence_logprob_sums(
    model: PreTrainedModel | PolicyWithValueHead,
    rollout_or_padded: Rollout | Mapping[str, torch.Tensor | int],
    batch_size: int = 64,
) -> torch.Tensor:
    """log π(y | x) = Σₜ log π(yₜ | x, y<ₜ) over each response's tokens, float32 (n,).

    Computed at temperature 1 from the model's logits, in inference mode with the model in
    eval mode, via `shift_for_causal_lm` + `sequence_logprobs`. Evaluation estimates the KL
    divergence to a reference policy from samples y ~ π as
    KL(π ‖ π_ref) ≈ mean over samples of [log π(y|x) − log π_ref(y|x)]
    (the k1 estimator; Schulman, "Approximating KL divergence", 2020).

    Args:
        model: a causal LM or a `PolicyWithValueHead` (its `.lm` is run).
        rollout_or_padded: a `Rollout` (padded per batch here, rows sorted by length), or the
            dict from `Rollout.to_padded` (needs input_ids, attention_mask, response_mask).
        batch_size: rows per forward pass.
    """
    require_batch_size(batch_size)
    lm = model.lm if isinstance(model, PolicyWithValueHead) else model
    device = device_of(lm)
    sums: list[tuple[list[int], torch.Tensor]] = []
    with eval_mode(model), torch.inference_mode():
        for rows, padded in _padded_batches(rollout_or_padded, batch_size):
            input_ids = padded["input_ids"].to(device)  # (b, seq)
            attention_mask = padded["attention_mask"].to(device)  # (b, seq)
            response_mask = padded["response_mask"].to(device)  # (b, seq)
            if bool(response_mask[:, 0].any()):
                raise ValueError(
                    "A response token sits at position 0, where no logit predicts it; every "
                    "sequence needs at least one prompt token before its response."
                )
            logits = lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).logits  # (b, seq, vocab)
            shifted = shift_for_causal_lm(logits, input_ids, response_mask)
            sums.append((rows, sequence_logprobs(*shifted).float().cpu()))
    total = sum(len(rows) for rows, _ in sums)
    result = torch.empty(total, dtype=torch.float32)
    for rows, values in sums:
        result[rows] = values
    return result


def _padded_batches(
    rollout_or_padded: Rollout | Mapping[str, torch.Tensor | int], batch_size: int
) -> Iterator[tuple[list[int], Mapping[str, torch.Tensor | int]]]:
    """`(row indices, padded tensors for those rows)` per batch."""
    if isinstance(rollout_or_padded, Rollout):
        lengths = [
            len(prompt) + len(response)
            for prompt, response in zip(
                rollout_or_padded.prompt_ids, rollout_or_padded.response_ids, strict=True
            )
        ]
        for rows in length_sorted_batches(lengths, batch_size):
            yield rows, rollout_or_padded.select(rows).to_padded(_MASKED_PAD_ID)
        return
    missing = {"input_ids", "attention_mask", "response_mask"} - set(rollout_or_padded)
    if missing:
        raise ValueError(
            f"The padded batch lacks {sorted(missing)}; pass a Rollout or Rollout.to_padded()."
        )
    n = rollout_or_padded["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        yield (
            rows,
            {
                key: rollout_or_padded[key][start : start + batch_size]
                for key in ("input_ids", "attention_mask", "response_mask")
            },
        )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of `batch_size`, longest first, so padding per batch stays small.

    Longest first also makes an out-of-memory error show up on the first batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable for ties
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both (batch, longest) long, padded on `side`."""
    width = max(len(ids) for ids in sequences)
    input_rows, mask_rows = [], []
    for ids in sequences:
        padding = width - len(ids)
        if side == "left":
            input_rows.append([pad_id] * padding + list(ids))
            mask_rows.append([0] * padding + [1] * len(ids))
        else:
            input_rows.append(list(ids) + [pad_id] * padding)
            mask_rows.append([1] * len(ids) + [0] * padding)
    return torch.tensor(input_rows, dtype=torch.long), torch.tensor(mask_rows, dtype=torch.long)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of already-templated texts (no special tokens added)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` in eval mode, then restore each submodule's own train/eval mode."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Fork the CPU RNG, and the CUDA RNG of `device` when it is a GPU, for the block."""
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield


def _maybe_track(batches: list[list[int]], progress: bool, description: str) -> Iterable[list[int]]:
    """`batches`, wrapped in a rich progress bar when `progress` is set."""
    if not progress:
        return batches
    from rich.progress import track

    return track(batches, description=description)


def device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def pad_and_eos_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no EOS token, so responses cannot end; set tokenizer.eos_token."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token; call rlhf_core.models.ensure_pad_token(tokenizer)."
        )
    return tokenizer.pad_token_id, tokenizer.eos_token_id


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.chat_template:
        raise ValueError(
            "The tokenizer has no chat template; call "
            "rlhf_core.models.ensure_chat_template(tokenizer) to give it the default one."
        )
