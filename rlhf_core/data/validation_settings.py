"""The settings of data validation (params.yaml `data.validation`): thresholds of the row
checks and of the data-set gate. Apart from the checks themselves, so that the expectations
and the validation that runs them can both read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationSettings:
    """Thresholds of the row checks and the dataset gate.

    Attributes:
        max_chars: most characters allowed in one text (each prompt message content and each
            response is measured on its own).
        min_tokens: fewest tokens allowed in a row's shortest response (in the prompt of a
            ``prompts`` row); only checked when a tokenizer is given.
        max_tokens: most tokens allowed in the prompt (all message contents) plus the row's
            longest response; only checked when a tokenizer is given. Special tokens and the
            chat template are not counted.
        min_valid_fraction: the data set passes when valid / total is at least this.
        length_bias_threshold: warn (`length_bias`) when chosen is longer than rejected in more
            than this fraction of the valid pairs, or shorter in more than this fraction.
        check_duplicates: quarantine rows whose content repeats an earlier row (`duplicate_row`).
    """

    max_chars: int = 20000
    min_tokens: int = 1
    max_tokens: int = 2048
    min_valid_fraction: float = 0.9
    length_bias_threshold: float = 0.7
    check_duplicates: bool = True

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {self.max_chars}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"need 0 <= min_tokens <= max_tokens, got min_tokens={self.min_tokens} and "
                f"max_tokens={self.max_tokens}"
            )
        for name in ("min_valid_fraction", "length_bias_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
