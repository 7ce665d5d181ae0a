"""Scalar heads on transformer backbones: a reward model and a policy with a value head.

Both pool or read the final hidden state, and both compute position ids from the attention mask
so that a left-padded sequence is scored exactly like the same sequence right-padded.
"""

import inspect
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_core.models.loading import atomic_directory, require_safetensors

HEAD_FORMAT_VERSION = 1


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row: `clamp(cumsum(mask) - 1, min=0)`.

    (batch, seq) -> (batch, seq) long. Padding gets position 0 (its value never matters: padding
    is masked out of attention). With left padding this starts real tokens at 0, as in training.
    Rotary (RoPE) models barely notice a uniform shift, since attention sees only relative
    positions; backbones with absolute position embeddings (GPT-2, BERT) need this to be right.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row: `argmax(arange(seq) * mask)`.

    (batch, seq) -> (batch,) long. Correct for right, left and no padding; raises ValueError if a
    row has no real token.
    """
    mask = attention_mask.long()
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ValueError("A row of attention_mask has no tokens (all zeros); drop empty sequences.")
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (seq,)
    # argmax returns the first maximum; a row whose only real token is at 0 is all zeros -> 0.
    return (positions * mask).argmax(dim=-1)


def disable_dropout(model: nn.Module) -> int:
    """Turn off every dropout of `model` (dropout layers, and the attention dropout rate that
    Llama-style attention modules and configs keep as a number); returns how many were on.

    Preference and reward losses compare log-probabilities or scores of two responses from two
    forward passes; dropout would add noise of its own to the difference, so TRL's DPO and
    reward trainers turn it off (`disable_dropout=True`), as this does by default.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, switched = 0.0, switched + 1
        for name in ("attention_dropout", "dropout"):
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                switched += 1
        config = getattr(module, "config", None)
        for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop"):
            if isinstance(getattr(config, name, None), float) and getattr(config, name) > 0:
                setattr(config, name, 0.0)
    return switched


def init_scalar_head(hidden_size: int, seed: int = 0) -> nn.Linear:
    """A `hidden_size -> 1` float32 linear head, weight ~ N(0, 1/(hidden_size+1)), bias 0.

    Seeded by its own generator, so the global torch RNG is untouched.
    """
    head = nn.utils.skip_init(nn.Linear, hidden_size, 1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(
            head.weight, mean=0.0, std=1.0 / math.sqrt(hidden_size + 1), generator=generator
        )
        nn.init.zeros_(head.bias)
    return head


def _hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def _forward_kwargs(
    module: nn.Module, attention_mask: torch.Tensor, **extra: object
) -> dict[str, object]:
    """Mask-derived position ids plus `extra`, keeping only what `module.forward` accepts."""
    kwargs = {
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }
    kwargs.update(extra)
    parameters = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {name: value for name, value in kwargs.items() if name in parameters}


def _save_with_head(
    trunk: PreTrainedModel,
    head: nn.Linear,
    path: str | os.PathLike,
    names: tuple[str, str],
    meta: dict,
    tokenizer: PreTrainedTokenizerBase | None,
) -> Path:
    """Write the trunk (safetensors), the head (`names[0]`), its metadata (`names[1]`) and the
    optional tokenizer to `path`, atomically replacing it."""
    head_file, meta_file = names
    with atomic_directory(path) as staging:
        trunk.save_pretrained(staging)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
            staging / head_file,
        )
        (staging / meta_file).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(path)


def _load_head(directory: Path, head_file: str, meta_file: str, expected_format: str) -> nn.Linear:
    meta_path, head_path = directory / meta_file, directory / head_file
    if not meta_path.is_file() or not head_path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a saved {expected_format}: "
            f"it needs {meta_file} and {head_file}."
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != expected_format:
        raise ValueError(
            f"{str(meta_path)!r} describes a {meta.get('format')!r}, not a {expected_format!r}; "
            "load it with the matching class."
        )
    state = load_file(head_path)
    head = nn.utils.skip_init(nn.Linear, meta["hidden_size"], 1, dtype=torch.float32)
    head.load_state_dict(state)
    return head


class RewardModel(nn.Module):
    """A transformer backbone with a scalar `score` head on the last real token.

    r(x) = w · h_T(x) + b, where h_T is the final hidden state at the last position with mask 1.
    """

    head_file = "score_head.safetensors"
    meta_file = "reward_model.json"
    format_name = "rlhf_core.reward_model"

    def __init__(self, backbone: PreTrainedModel, score: nn.Linear | None = None, seed: int = 0):
        """Wrap `backbone` (a base model returning `last_hidden_state`, e.g. `LlamaModel`).

        `score` defaults to `init_scalar_head(hidden_size, seed)`.
        """
        super().__init__()
        self.backbone = backbone
        self.score = score if score is not None else init_scalar_head(_hidden_size(backbone), seed)

    @classmethod
    def from_causal_lm(cls, causal_lm: PreTrainedModel, seed: int = 0) -> "RewardModel":
        """Reuse `causal_lm`'s base model as the backbone (the LM head is dropped).

        The backbone's modules are shared with `causal_lm`, not copied; deep-copy first if you
        need the causal LM unchanged while the reward model trains.
        """
        backbone = causal_lm.base_model
        if backbone is causal_lm:
            raise ValueError(
                f"{type(causal_lm).__name__} has no separate base model to use as a backbone; "
                "pass a model with a base_model_prefix (e.g. LlamaForCausalLM)."
            )
        return cls(backbone, seed=seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (batch,) float32 for `input_ids`, `attention_mask` (batch, seq); any padding."""
        kwargs = _forward_kwargs(self.backbone, attention_mask, use_cache=False)
        hidden = self.backbone(
            input_ids=input_ids, **kwargs
        ).last_hidden_state  # (batch, seq, hidden)
        last = last_token_index(attention_mask)  # (batch,)
        pooled = hidden[
            torch.arange(hidden.shape[0], device=hidden.device), last
        ]  # (batch, hidden)
        return self.score(pooled.to(self.score.weight.dtype)).squeeze(-1)

    def save_pretrained(
        self, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> Path:
        """Write backbone (safetensors), `score_head.safetensors`, `reward_model.json` and the
        optional tokenizer to the directory `path`, atomically replacing it."""
        meta = {
            "format": self.format_name,
            "format_version": HEAD_FORMAT_VERSION,
            "hidden_size": self.score.in_features,
            "pooling": "last_token",
            "backbone_class": type(self.backbone).__name__,
        }
        names = (self.head_file, self.meta_file)
        return _save_with_head(self.backbone, self.score, path, names, meta, tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> "RewardModel":
        """Load a reward model written by `save_pretrained` (safetensors only).

        The backbone is loaded in `dtype`; the score head stays float32."""
        directory = Path(path).expanduser()
        score = _load_head(directory, cls.head_file, cls.meta_file, cls.format_name)
        require_safetensors(str(directory))
        backbone = AutoModel.from_pretrained(
            directory, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return cls(backbone, score=score)


class RewardEnsemble(nn.Module):
    """k reward models scored together; `forward` gives their mean score, so anything that
    scores one reward model (a held-out evaluation, `scoring.score_token_ids`) scores the
    ensemble's mean r̄(x) = (1/k) Σ_i r_i(x)."""

    def __init__(self, members: list[RewardModel]):
        super().__init__()
        if not members:
            raise ValueError("A reward ensemble needs at least one member.")
        self.members = nn.ModuleList(members)

    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each member's rewards, (members, batch) float32, for (batch, seq) inputs."""
        return torch.stack([member(input_ids, attention_mask) for member in self.members])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The members' mean reward, (batch,) float32."""
        return self.member_scores(input_ids, attention_mask).mean(dim=0)


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a linear value head on its final hidden states, for PPO.

    One forward gives next-token logits and a value per position: V(s_t) = w · h_t + b.
    """

    head_file = "value_head.safetensors"
    meta_file = "value_head.json"
    format_name = "rlhf_core.policy_with_value_head"

    def __init__(self, lm: PreTrainedModel, value_head: nn.Linear | None = None, seed: int = 0):
        """Wrap causal LM `lm`; `value_head` defaults to `init_scalar_head(hidden_size, seed)`."""
        super().__init__()
        self.lm = lm
        self.value_head = (
            value_head if value_head is not None else init_scalar_head(_hidden_size(lm), seed)
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits (batch, seq, vocab), values (batch, seq) float32)` for any padding side."""
        kwargs = _forward_kwargs(
            self.lm, attention_mask, use_cache=False, output_hidden_states=True
        )
        output = self.lm(input_ids=input_ids, **kwargs)
        hidden = output.hidden_states[-1]  # (batch, seq, hidden), after the final norm
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return output.logits, values

    def generate(self, *args, **kwargs):
        """`self.lm.generate(*args, **kwargs)`: sampling needs no value head."""
        return self.lm.generate(*args, **kwargs)

    def save_pretrained(
        self, path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> Path:
        """Write the LM (safetensors), `value_head.safetensors`, `value_head.json` and the optional
        tokenizer to `path`, atomically. `load_causal_lm(path)` also reads the LM alone."""
        meta = {
            "format": self.format_name,
            "format_version": HEAD_FORMAT_VERSION,
            "hidden_size": self.value_head.in_features,
            "lm_class": type(self.lm).__name__,
        }
        names = (self.head_file, self.meta_file)
        return _save_with_head(self.lm, self.value_head, path, names, meta, tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32
    ) -> "PolicyWithValueHead":
        """Load a policy written by `save_pretrained` (safetensors only); head stays float32."""
        directory = Path(path).expanduser()
        value_head = _load_head(directory, cls.head_file, cls.meta_file, cls.format_name)
        require_safetensors(str(directory))
        lm = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return cls(lm, value_head=value_head)
