"""Small pieces every training and evaluation stage uses: validated data in, metrics out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
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


def run_fingerprint(settings: Any, data: Any, seed: int, inputs: Mapping[str, Path]) -> str:
    """sha256 of a stage's settings, seed, split and input md5s: a changed run never resumes
    a stale checkpoint."""
    import dataclasses
    import hashlib

    from rlhf_core.tracking.lineage import path_md5

    payload = {
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "split": [data.eval_fraction, data.split_salt],
        "inputs": {name: path_md5(Path(path)) for name, path in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def training_label(train: Any) -> str:
    """The key knobs of a training run, for its MLflow run name: `lr=0.005 epochs=8`."""
    return f"lr={train.learning_rate:g} epochs={train.epochs:g}"


def eval_metric_name(name: str) -> str:
    """MLflow key of a held-out metric: eval_loss -> eval/loss."""
    return f"eval/{name.removeprefix('eval_')}"


def training_curves(
    history: Sequence[Mapping[str, float]], eval_history: Sequence[Mapping[str, float]]
) -> dict[str, list[tuple[int, float]]]:
    """{series: [(step, value)]} of the per-step and held-out metrics (held-out as eval/…)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for rows, rename in ((history, str), (eval_history, eval_metric_name)):
        for row in rows:
            for name, value in row.items():
                if name not in ("step", "tokens"):
                    curves.setdefault(rename(name), []).append((int(row["step"]), float(value)))
    return curves


def write_curve_plots(
    run: Any, curves: dict, paths: ProjectPaths, stage: str, shown: Sequence[str], title: str
) -> None:
    """artifacts/plots/<stage>_curves.json (every series, for `dvc plots`) and a PNG of the
    `shown` series, also logged to the stage's MLflow run."""
    from rlhf_core.evaluation.report import curves_figure, write_curves_json

    write_curves_json(curves, paths.plots_dir / f"{stage}_curves.json")
    figure = curves_figure({k: v for k, v in curves.items() if k in shown}, title)
    figure.savefig(paths.plots_dir / f"{stage}_curves.png", dpi=100)
    run.log_figure(figure, f"plots/{stage}_curves.png")
