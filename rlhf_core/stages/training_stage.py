"""The skeleton every training stage shares (sft, reward, policy@dpo, policy@ppo).

    with run_training_stage(STAGE, settings, data=data, seed=seed, root=root,
                            inputs=inputs, label=label, datasets=datasets) as stage:
        model, task = ...                       # the stage's own part
        result = stage.train(model, task, description="sft", show_progress=...)
        ...save the model to out_dir...
        stage.finish(result, metrics, out_dir, shown=(...), title="...")

`run_training_stage` opens the stage's MLflow run with the section's settings, the split and
the seed as params, logs the training and held-out data sets, and seeds every RNG. `train`
resumes from the newest checkpoint of an interrupted run with the same fingerprint (settings,
seed, split, input md5s) and streams per-step and held-out metrics to the run. `finish` writes
artifacts/metrics/<stage>.json, the curves (JSON for `dvc plots` and a PNG) and logs the model
and its output record. Checkpoints are removed once the run has ended well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_core.config import DataSettings
from rlhf_core.files import write_json
from rlhf_core.paths import ProjectPaths
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import seed_everything, train


@dataclass(frozen=True)
class LoggedDataset:
    """A data set a stage trains or evaluates on, logged as an MLflow dataset input."""

    name: str  # e.g. "sft_train"
    frame: pd.DataFrame
    context: str  # "training" | "evaluation"
    source: Path  # the validated file it came from


@dataclass
class TrainingStage:
    """One training stage's open MLflow run and checkpoint directory."""

    name: str
    paths: ProjectPaths
    run: Any  # tracking.runs.StageRun
    fingerprint: str
    keep_checkpoints: int
    checkpoints: CheckpointManager | None = field(default=None)

    def checkpoint_manager(self) -> CheckpointManager:
        """The stage's checkpoints (artifacts/checkpoints/<stage>), bound to the fingerprint."""
        if self.checkpoints is None:
            self.checkpoints = CheckpointManager(
                self.paths.checkpoints_dir(self.name),
                keep=self.keep_checkpoints,
                fingerprint=self.fingerprint,
            )
        return self.checkpoints

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step training metrics to the run (the loop's token count is not a curve)."""
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "tokens"}, step)

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Held-out metrics to the run, as eval/<name>."""
        self.run.log_metrics({eval_metric_name(k): v for k, v in metrics.items()}, step)

    def train(
        self, model: Any, task: Any, train_settings: Any, description: str, show_progress: bool
    ) -> Any:
        """`training.loop.train` with this stage's checkpoints and metric logging."""
        result = train(
            model,
            task,
            train_settings,
            checkpoints=self.checkpoint_manager(),
            on_log=self.log_step,
            on_eval=self.log_eval,
            description=description,
            show_progress=show_progress,
        )
        self.run.set_tags({"resumed_from": result.resumed_from})
        return result

    def finish(
        self,
        metrics: dict[str, Any],
        step: int,
        curves: dict[str, list[tuple[int, float]]],
        model_dir: Path,
        shown: Sequence[str],
        title: str,
    ) -> dict[str, Any]:
        """Write and log the final metrics and curves, log the model, record the output.

        A final metric named like a curve (PPO's last-iteration values) is not logged again.
        """
        metrics_file = self.paths.metrics_file(self.name)
        write_json(metrics_file, metrics)
        self.run.log_metrics(  # the summary values that are not already a curve
            {k: v for k, v in metrics.items() if isinstance(v, int | float) and k not in curves},
            step,
        )
        write_curve_plots(self.run, curves, self.paths, self.name, shown, title)
        self.run.log_artifact(metrics_file, "metrics")
        self.run.log_model_dir(model_dir, "model")
        self.run.record_output(model_dir)
        return metrics


@contextmanager
def run_training_stage(
    name: str,
    settings: Any,
    *,
    data: DataSettings,
    seed: int,
    root: Path,
    inputs: Mapping[str, Path],
    label: str,
    datasets: Sequence[LoggedDataset] = (),
    keep_checkpoints: int,
) -> Iterator[TrainingStage]:
    """Open the stage's MLflow run, log its data sets and seed everything (module docstring)."""
    from rlhf_core.tracking.runs import stage_run

    paths = ProjectPaths(root)
    params = {
        name: dataclasses.asdict(settings),
        "data.eval_fraction": data.eval_fraction,
        "data.split_salt": data.split_salt,
        "seed": seed,
    }
    with stage_run(name, project_root=root, params=params, inputs=inputs, label=label) as run:
        for dataset in datasets:
            if len(dataset.frame):
                run.log_dataset(
                    dataset.frame, dataset.name, context=dataset.context, source=dataset.source
                )
        seed_everything(seed)
        stage = TrainingStage(
            name=name,
            paths=paths,
            run=run,
            fingerprint=run_fingerprint(settings, data, seed, inputs),
            keep_checkpoints=keep_checkpoints,
        )
        yield stage
    if stage.checkpoints is not None:
        stage.checkpoints.clear()


def run_fingerprint(settings: Any, data: Any, seed: int, inputs: Mapping[str, Path]) -> str:
    """sha256 of a stage's settings, seed, split and input md5s: a changed run never resumes
    a stale checkpoint."""
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
    rename: Callable[[str], str]
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

    run.log_artifact(write_curves_json(curves, paths.plots_dir / f"{stage}_curves.json"), "plots")
    figure = curves_figure({k: v for k, v in curves.items() if k in shown}, title)
    figure.savefig(paths.plots_dir / f"{stage}_curves.png", dpi=100)
    run.log_figure(figure, f"plots/{stage}_curves.png")
