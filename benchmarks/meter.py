"""One way to time training steps and count their tokens, applied alike to ours and TRL's.

A forward pre-hook on the model's decoder (the module holding `embed_tokens` and `layers`)
records the real length of every row of every forward pass run with gradients on (training
forwards; reference and evaluation passes run without gradients and are not counted). A row's
length is its attention-mask sum, padding excluded; rows without a mask (packed or
padding-free input) count every position. `end_step()` closes an optimizer step: its wall time
is the time since the previous step ended. Throughput is Σ tokens / Σ seconds over the timed
steps, after the warm-up steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def find_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer trunk inside `model` (a module with `embed_tokens` and `layers`)."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder with embed_tokens and layers")


def _row_lengths(args: tuple, kwargs: dict) -> list[int]:
    mask = kwargs.get("attention_mask")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return [int(n) for n in mask.sum(-1).tolist()]
    if isinstance(input_ids, torch.Tensor):
        return [input_ids.shape[-1]] * (input_ids.shape[0] if input_ids.dim() == 2 else 1)
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor):
        return [embeds.shape[1]] * embeds.shape[0]
    raise ValueError("a decoder forward without input_ids or inputs_embeds")


@dataclass
class StepMeter:
    """Per-step wall time and real tokens of a training run (see the module docstring)."""

    warmup_steps: int
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_rows: list[list[int]] = field(default_factory=list)
    _rows: list[int] = field(default_factory=list)
    _last: float | None = None
    _handle: object = None

    def attach(self, model: torch.nn.Module) -> StepMeter:
        """Start counting the tokens of `model`'s training forwards; the clock starts now."""
        self._handle = find_decoder(model).register_forward_pre_hook(self._hook, with_kwargs=True)
        self.start()
        return self

    def start(self) -> None:
        """(Re)start the clock of the next step, dropping anything counted so far."""
        self._rows = []
        self._last = time.perf_counter()

    def _hook(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            self._rows.extend(_row_lengths(args, kwargs))

    def end_step(self) -> None:
        """Close one optimizer step."""
        now = time.perf_counter()
        if self._last is None:
            raise RuntimeError("call attach() or start() before end_step()")
        self.step_seconds.append(now - self._last)
        self.step_tokens.append(sum(self._rows))
        self.step_rows.append(self._rows)
        self._rows = []
        self._last = now

    def detach(self) -> None:
        """Stop counting."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def timed_seconds(self) -> float:
        return sum(self.step_seconds[self.warmup_steps :])

    @property
    def timed_tokens(self) -> int:
        return sum(self.step_tokens[self.warmup_steps :])

    @property
    def timed_row_lengths(self) -> list[int]:
        return [n for rows in self.step_rows[self.warmup_steps :] for n in rows]

    def tokens_per_s(self) -> float:
        """Real tokens per second over the timed steps."""
        if len(self.step_seconds) <= self.warmup_steps:
            raise ValueError(
                f"{len(self.step_seconds)} steps recorded, none after {self.warmup_steps} warm-up"
            )
        return self.timed_tokens / self.timed_seconds
