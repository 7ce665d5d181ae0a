"""What every training and evaluation stage shares: its run context and its validated sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_core.config import DataSettings
from rlhf_core.config.compute import ComputeSettings
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


@dataclass(frozen=True)
class StageContext:
    """What every training and evaluation stage run shares: the data settings (the held-out
    split), the global seed, the project root, whether to draw progress bars, and where to
    compute (`compute`: device and precision, resolved on this machine by `device` and
    `precision`)."""

    data: DataSettings
    seed: int
    root: Path = Path(".")
    show_progress: bool = True
    compute: ComputeSettings = field(default_factory=ComputeSettings)

    @classmethod
    def from_params(cls, params: Any) -> StageContext:
        """The context of a params.yaml (`Params`) run from the project root."""
        return cls(data=params.data, seed=params.seed, compute=params.compute)

    @property
    def device(self) -> Any:
        """The torch device of `compute.device` on this machine (`devices.resolve_device`)."""
        from rlhf_core.devices import resolve_device

        return resolve_device(self.compute)

    def precision(self, stage_setting: str = "auto") -> str:
        """A stage's training precision: its own `train.mixed_precision` unless that is
        auto, else `compute.precision` resolved on this machine's device."""
        if stage_setting != "auto":
            return stage_setting
        from rlhf_core.devices import resolve_precision

        return resolve_precision(self.compute, self.device)
