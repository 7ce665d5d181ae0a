"""Validated data in: the pieces every training and evaluation stage reads its sets with."""

from __future__ import annotations

from typing import Any

import pandas as pd

from rlhf_core.data.splits import split_frame
from rlhf_core.paths import ProjectPaths


def plain(value: Any) -> Any:
    """Parquet gives numpy arrays for list columns; turn them into plain Python values."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def load_validated(paths: ProjectPaths, set_name: str) -> pd.DataFrame:
    """The valid rows of a validated set (data/validated/<set>/valid.parquet)."""
    path = paths.validated_set(set_name) / "valid.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `rlhf stage validate` first")
    frame = pd.read_parquet(path)
    return frame.map(plain) if len(frame) else frame


def train_eval_split(
    frame: pd.DataFrame, eval_fraction: float, salt: str = ""
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stable split by prompt hash (a prompt never moves between splits as data grows).

    Rows whose input already says `split` keep it.
    """
    train, held_out = split_frame(frame, eval_fraction, salt)
    return train.reset_index(drop=True), held_out.reset_index(drop=True)


def load_split(paths: ProjectPaths, set_name: str, data: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and held-out rows of a validated set, split as `data` (DataSettings) says."""
    return train_eval_split(load_validated(paths, set_name), data.eval_fraction, data.split_salt)
