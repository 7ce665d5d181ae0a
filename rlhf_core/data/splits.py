"""Stable train/eval splits by prompt: the same prompt always lands in the same split.

A prompt's split depends only on its content (its ``prompt_key``), the salt and the eval
fraction, never on the order of the data or on other rows, so adding data later never moves
an existing prompt between splits, and all rows sharing a prompt share a split (no prompt
leaks from train into eval).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pandas as pd

from rlhf_core.data.schemas import SPLIT_FIELD, SPLITS, prompt_key

Split = Literal["train", "eval"]


def _check_eval_fraction(eval_fraction: float) -> None:
    if isinstance(eval_fraction, bool) or not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be a number in [0, 1], got {eval_fraction!r}")


def split_position(prompt_messages: str | Sequence[Mapping[str, Any]], salt: str = "") -> float:
    """A prompt's position in [0, 1): the first 8 bytes of sha256(prompt_key + salt) / 2**64."""
    digest = hashlib.sha256((prompt_key(prompt_messages) + salt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(
    prompt_messages: str | Sequence[Mapping[str, Any]], eval_fraction: float, salt: str = ""
) -> Split:
    """``"eval"`` if the prompt's :func:`split_position` is below `eval_fraction`, else ``"train"``.

    Stable: depends only on the prompt, the salt and the fraction. Raising the fraction only
    moves prompts from train to eval, never back. A different salt gives an independent split.
    """
    _check_eval_fraction(eval_fraction)
    return "eval" if split_position(prompt_messages, salt) < eval_fraction else "train"


def _given_split(value: Any) -> str | None:
    """A row's own split, None when absent (pandas may show an absent value as NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value not in SPLITS:
        raise ValueError(
            f"split value {value!r} is not 'train' or 'eval'; fix the data's split column or "
            "leave it empty to assign the split by prompt"
        )
    return value


def split_frame(
    frame: pd.DataFrame, eval_fraction: float, salt: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, eval rows) of a canonical frame, each with its ``split`` column filled in.

    A row whose ``split`` column already says "train" or "eval" keeps it; every other row gets
    :func:`assign_split` of its ``prompt``. The frame's index is kept, so rows can be traced
    back to the input.
    """
    _check_eval_fraction(eval_fraction)
    if "prompt" not in frame.columns:
        raise ValueError("the frame has no 'prompt' column; read it with read_records first")
    given = frame[SPLIT_FIELD] if SPLIT_FIELD in frame.columns else [None] * len(frame)
    splits = [
        _given_split(split) or assign_split(prompt, eval_fraction, salt)
        for prompt, split in zip(frame["prompt"], given, strict=True)
    ]
    labelled = frame.assign(**{SPLIT_FIELD: pd.Series(splits, index=frame.index, dtype=object)})
    is_eval = labelled[SPLIT_FIELD] == "eval"
    return labelled[~is_eval], labelled[is_eval]


JUDGE_SALT = "/judge"


def judge_split(
    frame: pd.DataFrame, share: float, salt: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the proxy reward model's rows, the held-out judge's rows) of a training frame.

    A prompt goes to the judge when its :func:`split_position` under `salt` + "/judge" (a
    split independent of the train/eval one) is below `share`, so the two sets share no
    prompt, and, as with :func:`split_frame`, a prompt never moves as data grows. The judge is
    the stand-in for a gold judge where the data have none (Gao et al. 2023 compare a proxy
    against a reward model it never saw the data of).
    """
    if isinstance(share, bool) or not 0.0 < share < 1.0:
        raise ValueError(f"the judge's share must be a number in (0, 1), got {share!r}")
    if "prompt" not in frame.columns:
        raise ValueError("the frame has no 'prompt' column; read it with read_records first")
    is_judge = pd.Series(
        [split_position(prompt, salt + JUDGE_SALT) < share for prompt in frame["prompt"]],
        index=frame.index,
        dtype=bool,
    )
    return frame[~is_judge].reset_index(drop=True), frame[is_judge].reset_index(drop=True)
