"""What a sweep produces: its grid points, its errors, and the frontier of its finished experiments.

`collect_frontier` reads each experiment's evaluate.json and responses.jsonl through DVC,
`write_frontier` writes artifacts/plots/frontier.{json,png} and artifacts/sweep/frontier.md,
and `log_sweep` logs the MLflow run "sweep" with one nested run per point. Running the grid
is `orchestration.sweep`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.evaluation.comparison import BEST_OF_N_PREFIX, SFT
from rlhf_core.paths import ProjectPaths

if TYPE_CHECKING:
    from rlhf_core.config import Params
    from rlhf_core.evaluation.frontier import FrontierPoint

EVALUATE_METRICS = "evaluate"  # artifacts/metrics/evaluate.json
SWEEP_RUN = "sweep"  # the MLflow parent run's name and `stage` tag
POINT_RUN_TAG = "sweep_point"  # the `stage` tag of each point's nested run


class SweepError(RuntimeError):
    """A sweep that cannot start or whose experiments failed; the message says what to do."""


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: the policy it trains and the DVC experiment that trains it.

    Attributes:
        method: "dpo" or "ppo".
        parameter: the knob swept: "beta" (DPO) or "target_kl" (PPO).
        value: the knob's value.
        name: the DVC experiment's name (unique per sweep: it carries the sweep's start time).
        overrides: the `-S key=value` overrides of params.yaml, in order.
    """

    method: str
    parameter: str
    value: float
    name: str
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.method} {self.parameter}={self.value:g}"


@dataclass
class SweepResult:
    """What a sweep produced: its points, the frontier's points, the files written, the
    MLflow run, the experiments that failed (name -> log) and the wall time."""

    points: list[SweepPoint]
    frontier: list[FrontierPoint] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def collect_frontier(
    root: Path,
    params: Params,
    points: Sequence[SweepPoint],
    states: Mapping[str, Mapping[str, Any]],
    best_of_n: Sequence[int],
    *,
    best_of_n_from: str,
) -> list[FrontierPoint]:
    """The frontier points of the finished experiments: each policy's KL from its
    evaluate.json, and its mean scores with 95% intervals over prompts from its
    responses.jsonl (read from DVC's cache at the experiment's commit); best-of-n (and SFT
    as best-of-1) from the experiment named `best_of_n_from`, when it finished."""
    from rlhf_core.evaluation.frontier import FrontierPoint

    metrics_path = _relative(ProjectPaths(root).metrics_file(EVALUATE_METRICS), root)
    frontier = []
    for point in points:
        state = states[point.name]
        results = state["metrics"].get(metrics_path) or {}
        responses = _responses(root, state["rev"])
        names = [(point.method, point.parameter, point.value, point.method)]
        if point.name == best_of_n_from:
            names += [("best_of_n", "n", 1, SFT)] if 1 in best_of_n else []
            names += [
                ("best_of_n", "n", n, f"{BEST_OF_N_PREFIX}{n}") for n in sorted(best_of_n) if n > 1
            ]
        for method, parameter, value, name in names:
            if name not in results:
                raise SweepError(
                    f"experiment {point.name}: {metrics_path} has no results for {name}; the "
                    "evaluate stage did not evaluate it."
                )
            gold, reward = _estimates(responses.get(name, []), params.seed)
            frontier.append(
                FrontierPoint(
                    method=method,
                    parameter=parameter,
                    value=float(value),
                    kl=float(results[name]["kl_to_sft"]),
                    kl_stderr=results[name].get("kl_to_sft_stderr"),
                    gold=gold,
                    rm=reward,
                    experiment=point.name,
                )
            )
    return frontier


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _responses(root: Path, rev: str) -> dict[str, list[dict[str, Any]]]:
    """The experiment's responses.jsonl rows by policy, read through DVC at commit `rev`."""
    import dvc.api

    path = _relative(ProjectPaths(root).evaluation_dir / "responses.jsonl", root)
    rows: dict[str, list[dict[str, Any]]] = {}
    with dvc.api.open(path, repo=str(root), rev=rev, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["policy"], []).append(row)
    return rows


def _estimates(rows: Sequence[Mapping[str, Any]], seed: int):
    """(gold, reward model) mean scores with intervals over prompts; gold None without one."""
    from rlhf_core.evaluation.frontier import score_estimate

    if not rows:
        raise SweepError("an evaluated policy has no responses in responses.jsonl.")
    prompts = [row["prompt_index"] for row in rows]
    reward = score_estimate([row["rm_score"] for row in rows], prompts, seed=seed)
    if any(row["gold_score"] is None for row in rows):
        return None, reward
    return score_estimate([row["gold_score"] for row in rows], prompts, seed=seed), reward


def write_frontier(
    paths: ProjectPaths, frontier: Sequence[FrontierPoint], num_prompts: int | None
) -> dict[str, Path]:
    """artifacts/plots/frontier.json (a DVC plot), artifacts/plots/frontier.png and
    artifacts/sweep/frontier.md; returns them by name (json, png, markdown)."""
    from rlhf_core.evaluation.frontier_report import (
        frontier_figure,
        frontier_markdown,
        frontier_rows,
    )
    from rlhf_core.files import write_json, writing

    written = {"json": write_json(paths.plots_dir / "frontier.json", frontier_rows(frontier))}
    written["png"] = paths.plots_dir / "frontier.png"
    with writing("the frontier figure", written["png"]):
        frontier_figure(frontier).savefig(written["png"], dpi=120)
    written["markdown"] = paths.root / "artifacts" / "sweep" / "frontier.md"
    with writing("the frontier report", written["markdown"]):
        written["markdown"].parent.mkdir(parents=True, exist_ok=True)
        written["markdown"].write_text(frontier_markdown(frontier, num_prompts), encoding="utf-8")
    return written


def log_sweep(root: Path, params: Params, result: SweepResult) -> str:
    """An MLflow run "sweep" (the grid as params, the verdicts as tags, the mean gaps as
    metrics, the figure and reports as artifacts) with one nested run per frontier point
    (params method, parameter, value, experiment; metrics its KL and scores with intervals)."""
    import mlflow

    from rlhf_core.evaluation.frontier_report import (
        comparisons,
        frontier_rows,
        gao_fits,
        grid_alarms,
    )
    from rlhf_core.tracking.runs import stage_run

    run_params = {
        "sweep": asdict(params.sweep),
        "evaluate.sampling": asdict(params.evaluate.sampling),
        "evaluate.max_prompts": params.sweep.eval_prompts or params.evaluate.max_prompts,
        "seed": params.seed,
        "experiments": [point.name for point in result.points],
    }
    with stage_run(SWEEP_RUN, project_root=root, params=run_params) as run:
        verdicts = comparisons(result.frontier)
        run.set_tags(
            {
                f"verdict.{kind}.{pair}": comparison.verdict
                for kind, pairs in verdicts.items()
                for pair, comparison in pairs.items()
            }
        )
        gaps = {
            f"{kind}/{pair}/mean_gap": comparison.mean_gap
            for kind, pairs in verdicts.items()
            for pair, comparison in pairs.items()
            if comparison.mean_gap is not None
        }
        fitted = {
            f"fit/{method}/{kind}/{name}": value
            for (method, kind), fit in gao_fits(result.frontier).items()
            for name, value in (
                ("alpha", fit.alpha),
                ("beta", fit.beta),
                ("r2", fit.r_squared),
                ("peak_kl", fit.peak_kl),
            )
            if value is not None and math.isfinite(value)
        }
        alarms = {
            f"alarm/{method}": float(alarm.fired)
            for method, alarm in grid_alarms(result.frontier).items()
            if alarm.status in ("fired", "silent")
        }
        run.log_metrics({**gaps, **fitted, **alarms, "points": float(len(result.frontier))}, step=0)
        experiment_id = mlflow.get_run(run.run_id).info.experiment_id
        for row in frontier_rows(result.frontier):
            with mlflow.start_run(
                experiment_id=experiment_id,  # else MLflow's default experiment
                run_name=f"{row['method']} {row['parameter']}={row['value']:g}",
                nested=True,
                tags={"stage": POINT_RUN_TAG},
            ):
                mlflow.log_params(
                    {key: row[key] for key in ("method", "parameter", "value", "experiment")}
                )
                mlflow.log_metrics(
                    {
                        key: float(value)
                        for key, value in row.items()
                        if key.startswith(("kl_to_sft", "gold_score", "rm_score"))
                        and value is not None
                    }
                )
        for path in result.outputs.values():
            run.log_artifact(path, "sweep")
        return run.run_id


def point_line(point: FrontierPoint) -> str:
    stderr = "" if point.kl_stderr is None else f" ± {point.kl_stderr:.3f}"
    scores = []
    for name, estimate in (("gold", point.gold), ("RM", point.rm)):
        if estimate is not None:
            scores.append(f"{name} {estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]")
    label = f"{point.method} {point.parameter}={point.value:g}"
    return f"  {label:<24} KL {point.kl:.3f}{stderr}  " + "  ".join(scores)
