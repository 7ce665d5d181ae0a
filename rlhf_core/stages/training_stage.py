"""The skeleton every training stage shares (sft, reward, policy@dpo, policy@ppo).

    with run_training_stage(STAGE, settings, context,
                            inputs=inputs, label=label, datasets=datasets) as stage:
        model, objective = ...                  # the stage's own part
        result = stage.train(model, objective, description="sft")
        ...save the model to out_dir...
        stage.finish(result, metrics, out_dir, shown=(...), title="...")

`run_training_stage` opens the stage's MLflow run with the section's settings, the split and
the seed as params, logs the training and held-out data sets, and seeds every RNG. `train`
resumes from the newest checkpoint of an interrupted run with the same fingerprint (settings,
seed, split, input md5s, the md5s of its code deps in dvc.yaml) and streams per-step and
held-out metrics to the run. `finish` writes artifacts/metrics/<stage>.json, the curves (JSON
for `dvc plots` and a PNG) and logs the model and its output record. Checkpoints are removed
once the run has ended well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_core.config import DataSettings
from rlhf_core.files import write_json, writing
from rlhf_core.models.heads import disable_dropout
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext, load_split
from rlhf_core.stages.stage_code import code_fingerprint
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import seed_everything, train

log = logging.getLogger(__name__)

# A model this large is a pretrained one (the demo's from-scratch models have about 1M
# parameters); fine-tuning it above this learning rate is a from-scratch setting.
PRETRAINED_PARAMETERS = 20_000_000
PRETRAINED_MAX_LEARNING_RATE = 2e-4

# The stage that writes each model input; validated sets come from `validate`.
INPUT_PRODUCERS = {"base_model": "prepare", "sft_model": "sft", "reward_model": "reward"}


class FollowerFinished(Exception):
    """Raised on a launched stage's other processes once their training is done: the main
    process alone logs, saves the model and writes the stage's outputs (`stage_launch`)."""


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes the stage's outputs: rank 0 of a launched stage (torchrun
    sets RANK), or a plain process."""
    import os

    return int((os.environ if environ is None else environ).get("RANK", "0") or 0) == 0


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
    settings: Any  # the stage's section of params.yaml (with a `train` subsection)
    context: StageContext
    paths: ProjectPaths
    run: Any  # tracking.runs.StageRun; None on a launched stage's other processes
    fingerprint: str
    checkpoints: CheckpointManager | None = field(default=None)
    is_main: bool = True  # this process logs and writes outputs (the only one unless launched)

    def main_process_only(self) -> None:
        """Past this point only the main process goes on: the others, their training part
        done, raise FollowerFinished (the stage command exits 0 for them)."""
        if not self.is_main:
            raise FollowerFinished(self.name)

    def checkpoint_manager(self) -> CheckpointManager:
        """The stage's checkpoints (artifacts/checkpoints/<stage>), bound to the fingerprint."""
        if self.checkpoints is None:
            self.checkpoints = CheckpointManager(
                self.paths.checkpoints_dir(self.name),
                keep=self.settings.train.keep_checkpoints,
                fingerprint=self.fingerprint,
            )
        return self.checkpoints

    def check_outputs(self, model: Any, model_dir: Path) -> None:
        """Before the first step: the folders this stage writes are writable and their file
        systems have room for the model and its checkpoints (`preflight`), else one
        `PreflightError` line."""
        from rlhf_core.stages.preflight import check_training_outputs

        check_training_outputs(
            self.name,
            model,
            self.settings.train,
            model_dir=model_dir,
            checkpoint_dir=self.paths.checkpoints_dir(self.name),
            small_outputs=(self.paths.metrics_dir, self.paths.plots_dir),
        )

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step training metrics to the run (the loop's token count is not a curve)."""
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "tokens"}, step)

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Held-out metrics to the run, as eval/<name>."""
        self.run.log_metrics({eval_metric_name(k): v for k, v in metrics.items()}, step)

    def train(self, model: Any, objective: Any, description: str) -> Any:
        """`training.loop.train` of the section's `train` settings (seeded with the stage's
        seed), with this stage's checkpoints and metric logging. Turns dropout off first
        (`train.disable_dropout`) and warns when the learning rate is a from-scratch one and
        the model a pretrained one."""
        switched = disable_dropout(model) if self.settings.train.disable_dropout else 0
        if switched and self.is_main:
            log.info(
                "%s: dropout turned off in %d places (train.disable_dropout)", self.name, switched
            )
        parameters = sum(parameter.numel() for parameter in model.parameters())
        warning = learning_rate_warning(self.name, parameters, self.settings.train.learning_rate)
        if warning is not None and self.is_main:
            log.warning(warning)
        settings = dataclasses.replace(
            self.settings.train,
            seed=self.context.seed,
            mixed_precision=self.context.precision(self.settings.train.mixed_precision),
        )
        result = train(
            model,
            objective,
            settings,
            accelerator=stage_accelerator(self.context, settings.mixed_precision),
            checkpoints=self.checkpoint_manager(),
            on_log=self.log_step,
            on_eval=self.log_eval,
            description=description,
            show_progress=self.context.show_progress,
        )
        self.main_process_only()
        self.run.set_tags({"resumed_from": result.resumed_from})
        return result

    def count_cut_ends(self, sequences: Sequence[Any], what: str) -> int:
        """How many tokenized sequences lost their end (EOS) to `max_length`; warns when any
        did. The count goes into the stage's metrics."""
        cut = sum(1 for sequence in sequences if sequence.end_cut)
        if cut and self.is_main:
            log.warning(
                "%s: %d of %d %s lost the end of their response, EOS included, to %s.max_length "
                "%s; raise it (the model learns not to stop from these)",
                self.name,
                cut,
                len(sequences),
                what,
                self.params_key,
                getattr(self.settings, "max_length", "?"),
            )
        return cut

    @property
    def params_key(self) -> str:
        """The params.yaml section of this stage: sft, reward, policy.dpo, policy.ppo."""
        return self.name if self.name in ("sft", "reward") else f"policy.{self.name}"

    def finish(
        self,
        result: Any,
        metrics: dict[str, Any],
        model_dir: Path,
        shown: Sequence[str],
        title: str,
    ) -> dict[str, Any]:
        """Write and log the final metrics and curves, log the model, record the output.

        `result` is the loop's TrainResult or PPOTrainResult (its `history`, `eval_history` and
        `global_step` make the curves); `shown` are the curves drawn in the PNG. A final metric
        named like a curve (PPO's last-iteration values) is not logged again.
        """
        curves = training_curves(result.history, result.eval_history)
        step = result.global_step
        metrics_file = self.paths.metrics_file(self.name)
        write_json(metrics_file, metrics, what=f"the {self.name} metrics")
        self.run.log_metrics(  # the summary values that are not already a curve
            {k: v for k, v in metrics.items() if isinstance(v, int | float) and k not in curves},
            step,
        )
        write_curve_plots(self.run, curves, self.paths, self.name, shown, title)
        self.run.log_artifact(metrics_file, "metrics")
        self.run.log_model_dir(model_dir, "model")
        self.run.record_output(model_dir)
        return metrics


def stage_accelerator(context: StageContext, precision: str) -> Any:
    """The accelerate `Accelerator` of a training stage: its resolved `precision` (fp32, bf16,
    fp16) on the context's device. On a CPU it is asked for explicitly (`cpu=True`):
    accelerate would take a visible GPU otherwise, and without one it would not join the
    processes of a launched stage (each would train alone)."""
    import os

    from accelerate import Accelerator

    from rlhf_core.config.training import MIXED_PRECISION
    from rlhf_core.training.distributed import unsupported_engine

    if (reason := unsupported_engine()) is not None:
        raise ValueError(reason)

    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION[precision], cpu=context.device.type == "cpu"
    )
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"this stage was launched as one of {launched} processes but accelerate joined "
            f"{accelerator.num_processes}; check the accelerate config (launch.config_file)"
        )
    return accelerator


def learning_rate_warning(stage: str, parameters: int, learning_rate: float) -> str | None:
    """A warning when a from-scratch learning rate (the demo's) meets a pretrained model."""
    if parameters < PRETRAINED_PARAMETERS or learning_rate <= PRETRAINED_MAX_LEARNING_RATE:
        return None
    return (
        f"{stage}: learning rate {learning_rate:g} on a {parameters / 1e6:.0f}M-parameter model "
        "is a from-scratch rate (the embedded demo's); fine-tuning a pretrained model usually "
        f"takes at most {PRETRAINED_MAX_LEARNING_RATE:g} (1e-5 to 5e-5 is common), and more "
        "makes it forget what it knew"
    )


def require_inputs(inputs: Mapping[str, Path]) -> None:
    """One clear error for the first missing input, naming the stage that writes it."""
    for name, path in inputs.items():
        if not Path(path).exists():
            producer = INPUT_PRODUCERS.get(name, "validate")
            raise FileNotFoundError(
                f"{path}: the {name} input is missing; run `rlhf stage {producer}` first."
            )


def split_for_training(
    paths: ProjectPaths, set_name: str, data: DataSettings, logged_as: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[LoggedDataset]]:
    """A validated set's train and held-out rows (`load_split`), and the two as data sets
    to log (`<logged_as>_train`, `<logged_as>_eval`; default the set's name)."""
    train_rows, held_out = load_split(paths, set_name, data)
    source = paths.validated_set(set_name) / "valid.parquet"
    name = logged_as or set_name
    logged = [
        LoggedDataset(f"{name}_train", train_rows, "training", source),
        LoggedDataset(f"{name}_eval", held_out, "evaluation", source),
    ]
    return train_rows, held_out, logged


@contextmanager
def run_training_stage(
    name: str,
    settings: Any,
    context: StageContext,
    *,
    inputs: Mapping[str, Path],
    label: str,
    datasets: Sequence[LoggedDataset] = (),
) -> Iterator[TrainingStage]:
    """Open the stage's MLflow run, log its data sets and seed everything (module docstring).

    `settings` is the stage's section; its `train.keep_checkpoints` bounds the checkpoints.
    """
    from rlhf_core.tracking.runs import stage_run

    require_inputs(inputs)
    paths = ProjectPaths(context.root)
    data, seed = context.data, context.seed
    params = {
        name: dataclasses.asdict(settings),
        "data.eval_fraction": data.eval_fraction,
        "data.split_salt": data.split_salt,
        "seed": seed,
    }
    main = is_main_process()
    opened = (
        stage_run(name, project_root=context.root, params=params, inputs=inputs, label=label)
        if main
        else nullcontext(None)  # another process of a launched stage: nothing to log
    )
    with opened as run:
        for dataset in datasets if main else ():
            if len(dataset.frame):
                run.log_dataset(
                    dataset.frame, dataset.name, context=dataset.context, source=dataset.source
                )
        seed_everything(seed)
        stage = TrainingStage(
            name=name,
            settings=settings,
            context=context,
            paths=paths,
            run=run,
            fingerprint=run_fingerprint(
                settings, data, seed, inputs, code_fingerprint(context.root, name)
            ),
            is_main=main,
        )
        yield stage
    if stage.checkpoints is not None:
        stage.checkpoints.clear()


def run_fingerprint(
    settings: Any,
    data: Any,
    seed: int,
    inputs: Mapping[str, Path],
    code: Mapping[str, str] | None = None,
) -> str:
    """sha256 of a stage's settings, seed, split, input md5s and code md5s (`stage_code`): a
    changed run never resumes a stale checkpoint."""
    from rlhf_core.tracking.lineage import path_md5

    payload = {
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "split": [data.eval_fraction, data.split_salt],
        "inputs": {name: path_md5(Path(path)) for name, path in sorted(inputs.items())},
        "code": dict(sorted((code or {}).items())),
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

    curves_json = paths.plots_dir / f"{stage}_curves.json"
    with writing(f"the {stage} curves", curves_json):
        write_curves_json(curves, curves_json)
    run.log_artifact(curves_json, "plots")
    figure = curves_figure({k: v for k, v in curves.items() if k in shown}, title)
    curves_png = paths.plots_dir / f"{stage}_curves.png"
    with writing(f"the {stage} curves plot", curves_png):
        figure.savefig(curves_png, dpi=100)
    run.log_figure(figure, f"plots/{stage}_curves.png")
