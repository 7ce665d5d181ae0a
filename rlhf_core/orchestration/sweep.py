"""`rlhf sweep`: the reward–KL frontier of DPO and PPO, one DVC experiment per grid point.

    dvc repro reward                          # shared: prepare, validate, sft, reward, once
    dvc exp run --queue -n <name> -S policy.algorithms=[dpo] -S policy.dpo.beta=0.05 ...
    dvc exp run --run-all --jobs 1            # every queued point, each in a temp workspace
    dvc exp show --json                       # each point's evaluate.json

A DPO point sets `policy.algorithms=[dpo]`, so its experiment has only the policy@dpo stage
and evaluates only that policy; a PPO point likewise. SFT and the reward model are the same
for every point: they are reproduced once in the workspace first, and every experiment
restores them from DVC's cache instead of training them again. Best-of-n is drawn once, with
the first point. Every point is evaluated on the same held-out prompts with the same sampling
and seed (the `evaluate` section), so the points differ only in the knob swept.

The frontier (`evaluation.frontier`; collected, written and logged by `sweep_results`) is
written to artifacts/plots/frontier.{json,png} and artifacts/sweep/frontier.md, and logged to
MLflow as a run "sweep" with one nested run per point. With `sweep.queue: false` the points
run one after another as `dvc exp run --temp`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rlhf_core.orchestration.sweep_results import (
    SweepError,
    SweepPoint,
    SweepResult,
    collect_frontier,
    log_sweep,
    point_line,
    write_frontier,
)
from rlhf_core.paths import ProjectPaths

if TYPE_CHECKING:
    from rlhf_core.config.sweep import SweepSettings

SHARED_TARGET = "reward"  # `dvc repro reward`: prepare, validate, sft and reward
KNOBS = {  # method -> (parameter name in reports, params.yaml key it sets)
    "dpo": ("beta", "policy.dpo.beta"),
    "ppo": ("target_kl", "policy.ppo.train.target_kl"),
}
Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# The grid and its commands (pure)
# --------------------------------------------------------------------------------------------


def _yaml_list(values: Sequence[Any]) -> str:
    return "[" + ",".join(str(value) for value in values) + "]"


def sweep_points(sweep: SweepSettings, eval_prompts: int | None, stamp: str) -> list[SweepPoint]:
    """One point per DPO β and per PPO KL target, DPO first, with their params overrides.

    Each point sets `policy.algorithms` to its one method (the other method's stage is not in
    its experiment), its knob (PPO also switches `adaptive_kl` on, which `target_kl` needs),
    and `evaluate.best_of_n`: the best-of-n baselines (n ≥ 2) with the first point, none with
    the others, since they are SFT samples and the same in every experiment. `eval_prompts`,
    when set, becomes every point's `evaluate.max_prompts`.
    """
    baselines = [n for n in sweep.best_of_n if n >= 2]
    grid = [("dpo", value) for value in sweep.dpo_betas]
    grid += [("ppo", value) for value in sweep.ppo_target_kls]
    points = []
    for index, (method, value) in enumerate(grid):
        parameter, key = KNOBS[method]
        overrides = [f"policy.algorithms=[{method}]", f"{key}={value!r}"]
        if method == "ppo":
            overrides.append("policy.ppo.train.adaptive_kl=true")
        overrides.append(f"evaluate.best_of_n={_yaml_list(baselines if index == 0 else [])}")
        if eval_prompts is not None:
            overrides.append(f"evaluate.max_prompts={eval_prompts}")
        points.append(
            SweepPoint(
                method,
                parameter,
                value,
                f"sweep-{stamp}-{method}-{parameter}-{value:g}",
                tuple(overrides),
            )
        )
    return points


def experiment_command(
    point: SweepPoint, *, queue: bool, copy_paths: Sequence[str] = ()
) -> list[str]:
    """The `dvc exp run` arguments of one point: `--queue` to stage it for the queue, else
    `--temp` to run it now in a temporary workspace; `-C` copies untracked inputs there."""
    command = ["exp", "run", "--queue" if queue else "--temp", "-n", point.name]
    for path in copy_paths:
        command += ["-C", path]
    for override in point.overrides:
        command += ["-S", override]
    return command


def queue_run_command(jobs: int) -> list[str]:
    """The `dvc` arguments that run every queued experiment and wait for them."""
    return ["exp", "run", "--run-all", "--jobs", str(jobs)]


def sweep_commands(
    points: Sequence[SweepPoint], *, queue: bool, jobs: int, copy_paths: Sequence[str] = ()
) -> list[list[str]]:
    """Every `dvc` command of a sweep, in order (what `--dry-run` prints)."""
    commands = [["repro", SHARED_TARGET]]
    commands += [experiment_command(p, queue=queue, copy_paths=copy_paths) for p in points]
    if queue:
        commands.append(queue_run_command(jobs))
    return commands


def describe_command(arguments: Sequence[str]) -> str:
    return shlex.join(["dvc", *arguments])


def untracked_inputs(dvc_yaml: Mapping[str, Any], tracked: set[str], exists: set[str]) -> list[str]:
    """Stage inputs a temporary experiment workspace would lack: deps that no stage produces,
    that git does not track (`tracked`) and no `.dvc` file versions, but that are there in the
    workspace (`exists`). A queued experiment starts from a git clone, so such a path, e.g.
    the preference store folder the prepare stage makes, must be copied (`dvc exp run -C`)."""
    deps: list[str] = []
    outs: list[str] = []
    for stage in (dvc_yaml.get("stages") or {}).values():
        body = stage.get("do", stage) if isinstance(stage, Mapping) else {}
        deps += [d for d in body.get("deps", []) if isinstance(d, str)]
        for out in body.get("outs", []):
            outs.append(out if isinstance(out, str) else next(iter(out)))
    produced = [out.split("${")[0].rstrip("/") for out in outs]
    found = []
    for dep in dict.fromkeys(d.rstrip("/") for d in deps if "${" not in d):
        made_by_a_stage = any(dep == out or dep.startswith(f"{out}/") for out in produced if out)
        if made_by_a_stage or dep in tracked or f"{dep}.dvc" in tracked:
            continue
        if dep in exists:
            found.append(dep)
    return found


def experiment_states(show: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{experiment name: {"state", "rev", "log", "metrics"}} from `dvc exp show --json`.

    "state" is DVC's executor state (queued, running, success, failed), "success" for an
    experiment without one (a finished `--temp` run); "metrics" maps each metrics file to its
    data."""
    states = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            revs = experiment.get("revs") or [{}]
            executor = experiment.get("executor") or {}
            data = revs[0].get("data") or {}
            metrics = {
                path: (found or {}).get("data")
                for path, found in (data.get("metrics") or {}).items()
            }
            states[experiment.get("name") or revs[0].get("name")] = {
                "state": executor.get("state", "success"),
                "rev": revs[0].get("rev"),
                "log": (executor.get("local") or {}).get("log"),
                "metrics": metrics,
            }
    return states


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def _dvc(arguments: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "dvc", *arguments]


def _run(
    arguments: Sequence[str], root: Path, env: Mapping[str, str], what: str
) -> subprocess.CompletedProcess:
    done = subprocess.run(_dvc(arguments), cwd=root, env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next(
            (line for line in lines if line.startswith("ERROR")), lines[-1] if lines else ""
        )
        raise SweepError(f"{what}: `{describe_command(arguments)}` failed in {root}: {reason}")
    return done


def _stream(
    arguments: Sequence[str],
    root: Path,
    env: Mapping[str, str],
    log_path: Path,
    on_line: Callable[[str], None] = lambda line: None,
) -> int:
    """Run `dvc <arguments>`, its output appended to `log_path` and each line to `on_line`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log_file:
        log_file.write(f"$ {describe_command(arguments)}\n")
        process = subprocess.Popen(
            _dvc(arguments),
            cwd=root,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            on_line(line.rstrip("\n"))
        return process.wait()


def check_project(root: Path) -> None:
    """A git repository with a commit and DVC initialised, with dvc.yaml and params.yaml
    committed: what queued experiments need, as each starts from a git clone of the last
    commit plus the workspace's changes to tracked files."""

    def git(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True)

    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise SweepError(
            f"{root} is not a git repository; DVC experiments need one: run `git init`, "
            "`dvc init` and commit the project."
        )
    if not (root / ".dvc").is_dir():
        raise SweepError(f"{root} has no .dvc folder; run `dvc init` there and commit it.")
    if git("rev-parse", "--verify", "--quiet", "HEAD").returncode != 0:
        raise SweepError(
            f"{root} has no git commit yet; DVC experiments start from one: commit dvc.yaml, "
            "params.yaml and the code (`git add -A && git commit`)."
        )
    for name in ("dvc.yaml", "params.yaml"):
        if git("ls-files", "--error-unmatch", name).returncode != 0:
            raise SweepError(
                f"{root / name} is not committed to git, and a queued experiment starts from "
                f"the last commit; run `git add {name} && git commit`."
            )


def _copy_paths(root: Path, *, planned: bool = False) -> list[str]:
    """`untracked_inputs` of the project at `root`; `planned` counts every input as there
    (a dry run, before the shared stages have made them)."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    listed = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    tracked = set(listed)
    tracked |= {str(folder) for name in listed for folder in Path(name).parents}
    deps = {d for stage in (dvc_yaml.get("stages") or {}).values() for d in _deps(stage)}
    exists = {dep.rstrip("/") for dep in deps if planned or (root / dep).exists()}
    return untracked_inputs(dvc_yaml, tracked, exists)


def _deps(stage: Any) -> list[str]:
    body = stage.get("do", stage) if isinstance(stage, Mapping) else {}
    return [dep for dep in body.get("deps", []) if isinstance(dep, str) and "${" not in dep]


def sweep_environment(root: Path) -> dict[str, str]:
    """The environment of every dvc command: the project's tracking store named explicitly,
    since a queued experiment runs in a temporary folder whose own mlflow.db would be lost."""
    from rlhf_core.tracking.experiment import TRACKING_URI_ENV, tracking_uri

    return {**os.environ, TRACKING_URI_ENV: tracking_uri(root)}


def run_sweep(
    params_path: Path,
    *,
    dry_run: bool = False,
    jobs: int | None = None,
    echo: Echo = print,
    stamp: str | None = None,
) -> SweepResult:
    """Run the sweep of `params_path`'s `sweep` section in its folder (see the module
    docstring); with `dry_run`, print the grid and the dvc commands and run nothing.

    Raises SweepError when the project cannot run experiments, when a dvc command fails, or,
    after writing the frontier of the points that finished, when any experiment failed.
    """
    from rlhf_core.config import load_params

    params_path = Path(params_path)
    if params_path.name != "params.yaml":
        raise SweepError(
            f"{params_path}: the experiments set keys of the project's params.yaml, the file "
            "dvc.yaml reads; pass that file."
        )
    root = params_path.resolve().parent
    params = load_params(params_path)
    sweep = params.sweep
    jobs = sweep.jobs if jobs is None else jobs
    if jobs < 1:
        raise SweepError(f"--jobs must be at least 1, got {jobs}.")
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    points = sweep_points(sweep, sweep.eval_prompts, stamp)
    is_project = (root / ".dvc").is_dir() and (root / ".git").exists()
    copy_paths = _copy_paths(root, planned=True) if is_project else []
    commands = sweep_commands(points, queue=sweep.queue, jobs=jobs, copy_paths=copy_paths)
    result = SweepResult(points)
    echo(f"Sweep: {len(points)} points, best-of-n {list(sweep.best_of_n) or 'none'}")
    for point in points:
        echo(f"  {point.label:<24} {point.name}")
    if dry_run:
        echo("Commands:")
        for command in commands:
            echo(f"  {describe_command(command)}")
        return result

    started = time.perf_counter()
    check_project(root)
    env = sweep_environment(root)
    _refuse_foreign_queue(root, env, {point.name for point in points})
    _ensure_experiment(root)  # before any temporary workspace could create it elsewhere
    paths = ProjectPaths(root)
    log_path = paths.root / "artifacts" / "sweep" / "logs" / f"sweep-{stamp}.log"

    from rlhf_core.orchestration.warm_stages import warm_stages

    with warm_stages(root) as server:
        if jobs == 1:  # the server runs one stage at a time
            env.update(server.environment())
        _run_shared_stages(root, env, log_path, echo)
        # Only now do the inputs the shared stages make (the preference store) exist.
        commands = sweep_commands(
            points, queue=sweep.queue, jobs=jobs, copy_paths=_copy_paths(root)
        )
        if sweep.queue:
            _run_queued(points, commands, root, env, log_path, jobs, echo)
        else:
            result.failed.update(_run_one_by_one(points, commands, root, env, log_path, echo))
    states = experiment_states(
        json.loads(_run(["exp", "show", "--json"], root, env, "reading the experiments").stdout)
    )
    for point in points:
        state = states.get(point.name)
        if point.name in result.failed:
            continue
        if state is None or state["state"] != "success":
            status = "not found" if state is None else state["state"]
            where = _keep_log((state or {}).get("log"), log_path.with_name(f"{point.name}.log"))
            result.failed[point.name] = f"{status}, log {where or log_path}"
    finished = [p for p in points if p.name not in result.failed]
    if finished:
        result.frontier = collect_frontier(
            root, params, finished, states, sweep.best_of_n, best_of_n_from=points[0].name
        )
        num_prompts = sweep.eval_prompts or params.evaluate.max_prompts
        result.outputs = write_frontier(paths, result.frontier, num_prompts)
        result.mlflow_run_id = log_sweep(root, params, result)
        for point in result.frontier:
            echo(point_line(point))
        echo(f"Frontier: {result.outputs['markdown']} and {result.outputs['png']}")
    result.seconds = time.perf_counter() - started
    if result.failed:
        failures = "; ".join(f"{name} ({why})" for name, why in result.failed.items())
        raise SweepError(
            f"{len(result.failed)} of {len(points)} sweep experiments failed: {failures}; read "
            "the log, fix the cause and run `rlhf sweep` again (finished points are reused "
            "from DVC's cache)."
        )
    return result


def _keep_log(executor_log: str | None, kept: Path) -> Path | None:
    """A copy of a queued experiment's log beside the sweep's: DVC removes its own copy when
    the queue is cleaned (`dvc queue remove`, `dvc exp gc`)."""
    import shutil

    if not executor_log or not Path(executor_log).is_file():
        return None
    shutil.copyfile(executor_log, kept)
    return kept


def _refuse_foreign_queue(root: Path, env: Mapping[str, str], ours: set[str]) -> None:
    """`--run-all` runs every queued experiment, so someone else's must not be waiting."""
    states = experiment_states(
        json.loads(_run(["exp", "show", "--json"], root, env, "reading the experiments").stdout)
    )
    waiting = sorted(
        name for name, s in states.items() if s["state"] == "queued" and name not in ours
    )
    if waiting:
        raise SweepError(
            f"DVC's experiment queue in {root} already holds {', '.join(waiting)}; run them "
            "(`dvc queue start`) or remove them (`dvc queue remove --queued`) before a sweep."
        )


def _ensure_experiment(root: Path) -> None:
    from mlflow import MlflowClient

    from rlhf_core.tracking.experiment import (
        artifact_location,
        ensure_experiment,
        experiment_name,
        tracking_uri,
    )

    uri = tracking_uri(root)
    ensure_experiment(MlflowClient(uri), experiment_name(), artifact_location(root, uri))


def _run_shared_stages(root: Path, env: Mapping[str, str], log_path: Path, echo: Echo) -> None:
    command = ["repro", SHARED_TARGET]
    echo(f"Shared stages (once, then cached): {describe_command(command)}")
    started = time.perf_counter()
    if _stream(command, root, env, log_path) != 0:
        raise SweepError(
            f"`{describe_command(command)}` failed in {root}; see {log_path}, fix the stage "
            "and run `rlhf sweep` again."
        )
    echo(f"Shared stages ready in {time.perf_counter() - started:.0f} s")


def _run_queued(
    points: Sequence[SweepPoint],
    commands: Sequence[Sequence[str]],
    root: Path,
    env: Mapping[str, str],
    log_path: Path,
    jobs: int,
    echo: Echo,
) -> None:
    for index, (point, command) in enumerate(zip(points, commands[1:], strict=False), start=1):
        _run(command, root, env, f"queueing {point.label}")
        echo(f"[{index}/{len(points)}] queued {point.label} as {point.name}")
    by_name = {point.name: point for point in points}
    started: list[str] = []

    def progress(line: str) -> None:
        # DVC prints "Reproducing experiment '<name>'" as each queued experiment starts.
        if line.startswith("Reproducing experiment '"):
            name = line.split("'")[1]
            if name in by_name and name not in started:
                started.append(name)
                echo(f"[{len(started)}/{len(points)}] running {by_name[name].label} ({name})")

    echo(f"Running the queue: {describe_command(queue_run_command(jobs))} (log {log_path})")
    _stream(queue_run_command(jobs), root, env, log_path, progress)


def _run_one_by_one(
    points: Sequence[SweepPoint],
    commands: Sequence[Sequence[str]],
    root: Path,
    env: Mapping[str, str],
    log_path: Path,
    echo: Echo,
) -> dict[str, str]:
    failed = {}
    for index, (point, command) in enumerate(zip(points, commands[1:], strict=False), start=1):
        echo(f"[{index}/{len(points)}] running {point.label} ({point.name})")
        point_log = log_path.with_name(f"{point.name}.log")
        if _stream(command, root, env, point_log) != 0:
            failed[point.name] = f"failed, log {point_log}"
    return failed
