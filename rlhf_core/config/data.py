"""Settings of the data: `data.validation` (thresholds of the row checks and of the data-set
gate) and `demo` (the embedded demo task's sizes and noise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_core.config.training import require_minimums
from rlhf_core.data.demo_grammar import EVAL_TITLES, TRAIN_TITLES, distinct_prompt_count


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
            chat template are not counted. None (the default) follows the `max_length` of the
            stages that train on the set (`Params.validation_for`); rows longer than that would
            be truncated there, losing their end. With no stage to follow, nothing is checked.
        min_valid_fraction: the data set passes when valid / total is at least this.
        length_bias_threshold: warn (`length_bias`) when chosen is longer than rejected in more
            than this fraction of the valid pairs, or shorter in more than this fraction.
        check_duplicates: quarantine rows whose content repeats an earlier row (`duplicate_row`).
        max_file_mb: largest data file read, in MiB (of a .jsonl.gz, once decompressed); a
            larger file is refused whole, before it is read (the retrain flow sets it aside in
            data/incoming/unreadable/). 1024 holds the usual preference sets in one file
            (HH-RLHF's largest split is ~170 MB of JSON Lines) while keeping what validation
            holds in memory (every row, in pandas and in the GX check frame, a few times the
            file) within an ordinary machine; a JSON file, parsed whole, needs several times
            its size, so JSON Lines suits big sets better.
        max_row_mb: largest single record, in MiB (a JSONL line, a CSV row, a JSON or Parquet
            record); a larger one is quarantined as `row_too_large` and a JSONL or CSV reader
            reads it through in blocks without holding it. `max_chars` is the per-text limit
            (`too_long_chars`); this one bounds what a reader holds for one record, so it must
            leave room for a record's texts: 16 MiB is hundreds of texts at the default
            `max_chars`.
    """

    max_chars: int = 20000
    min_tokens: int = 1
    max_tokens: int | None = None
    min_valid_fraction: float = 0.9
    length_bias_threshold: float = 0.7
    check_duplicates: bool = True
    max_file_mb: float = 1024.0
    max_row_mb: float = 16.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def max_row_bytes(self) -> int:
        return int(self.max_row_mb * 2**20)

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {self.max_chars}")
        for name in ("max_file_mb", "max_row_mb"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of MiB, got {value!r}")
        # A text of max_chars characters takes up to 4 bytes each in UTF-8.
        if not 4 * self.max_chars <= self.max_row_bytes <= self.max_file_bytes:
            raise ValueError(
                f"need 4 * max_chars <= max_row_mb <= max_file_mb (a record must hold one text "
                f"of max_chars characters, and fit in a file), got max_chars={self.max_chars}, "
                f"max_row_mb={self.max_row_mb} and max_file_mb={self.max_file_mb}"
            )
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"need 0 <= min_tokens <= max_tokens, got min_tokens={self.min_tokens} and "
                f"max_tokens={self.max_tokens}"
            )
        for name in ("min_valid_fraction", "length_bias_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, noise and response mix of the demo task (the `demo:` section of params.yaml).

    seed: seeds every draw; the same settings give byte-identical files.
    n_sft: SFT rows (prompt + one completion from the SFT-like response distribution).
    n_preference_prompts: preference pairs, one prompt each, two responses labelled by an annotator.
    n_ranked: K-wise ranked examples (0 writes no rankings file).
    ranking_k: responses per ranked example.
    n_ppo_prompts: distinct prompts for PPO rollouts (training titles).
    n_eval_prompts: distinct held-out prompts (evaluation titles, never seen in training).
    n_reward_eval_pairs: labelled pairs about the evaluation titles (data/raw/reward_eval.jsonl)
        on which the evaluate stage checks the reward model: accuracy ± its interval, the
        annotators' ceiling, calibration. 1000 pairs put the 95% interval of an accuracy near
        0.8 at about ±0.025; 0 writes no file and the held-out split of the preference set is
        used instead.
    annotator_temperature: Bradley-Terry / Plackett-Luce temperature T on gold scores in
        [-1, 1]; 0 is noiseless. 0.2 gives an agreement ceiling of about 0.87-0.88 here.
    n_annotators: size of the simulated annotator pool (ids recorded per pair).
    positive_prob, negative_prob: share of positive and negative reviews in the response
        distribution; the rest are mixed. Equal shares keep the SFT policy near neutral.
    degenerate_prob: share of degenerate responses (repetition, truncation, off-topic).
    """

    seed: int = 0
    n_sft: int = 2000
    n_preference_prompts: int = 1500
    n_ranked: int = 0
    ranking_k: int = 4
    n_ppo_prompts: int = 512
    n_eval_prompts: int = 200
    n_reward_eval_pairs: int = 1000
    annotator_temperature: float = 0.2
    n_annotators: int = 5
    positive_prob: float = 0.3
    negative_prob: float = 0.3
    degenerate_prob: float = 0.1

    def __post_init__(self) -> None:
        minimums = {
            "n_sft": 1,
            "n_preference_prompts": 1,
            "n_ranked": 0,
            "ranking_k": 2,
            "n_ppo_prompts": 0,
            "n_eval_prompts": 1,
            "n_reward_eval_pairs": 0,
            "n_annotators": 1,
        }
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"demo.seed must be an integer, got {self.seed!r}.")
        require_minimums("demo", self, minimums)
        temperature = self.annotator_temperature
        if not isinstance(temperature, int | float) or not math.isfinite(temperature):
            raise ValueError(f"demo.annotator_temperature must be a number, got {temperature!r}.")
        if temperature < 0:
            raise ValueError(
                f"demo.annotator_temperature must be >= 0 (0 = noiseless), got {temperature}."
            )
        for name in ("positive_prob", "negative_prob", "degenerate_prob"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"demo.{name} must be a probability in [0, 1], got {value!r}.")
        for name, titles in (("n_ppo_prompts", TRAIN_TITLES), ("n_eval_prompts", EVAL_TITLES)):
            available = distinct_prompt_count(titles)
            if getattr(self, name) > available:
                raise ValueError(
                    f"demo.{name} must be at most {available}, the number of distinct prompts "
                    f"the demo can write about its titles, got {getattr(self, name)}."
                )
        if self.positive_prob + self.negative_prob > 1.0:
            raise ValueError(
                "demo.positive_prob + demo.negative_prob must be at most 1 (the rest are mixed "
                f"reviews), got {self.positive_prob} + {self.negative_prob}."
            )
