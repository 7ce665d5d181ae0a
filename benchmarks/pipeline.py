"""What orchestration costs: the demo pipeline's wall time against its stages' own compute.

In a scratch copy of the project (its git-tracked files, a fresh git repository and DVC
cache, so the user's artifacts are never touched):

1. `rlhf run` from nothing: the whole demo pipeline in its own process, as a user runs it.
   Each stage process writes its split into start-up, tracking and compute
   (`rlhf_core.tracking.timing`); overhead = 1 − Σ compute / wall.
2. `rlhf run` again with everything up to date (the no-op flow), timed as a whole.
3. Prefect's own start-up, reported separately: a process that runs an empty flow minus a
   process that only imports Prefect (best of three each by default). The no-op flow's
   time beyond it is `noop_flow_s`.
4. `dvc repro` with nothing to do (best of three by default).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EMPTY_FLOW = "from prefect import flow\n@flow\ndef noop():\n    return 0\nnoop()\n"
IMPORT_PREFECT = "import prefect\n"


def project_environment(root: Path) -> dict[str, str]:
    """The environment a user's shell would give `rlhf` in `root` (venv first on PATH)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(root / ".prefect"),
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def merge_params(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s values, sections merged key by key (recursively)."""
    merged = dict(base)
    for key, value in override.items():
        is_section = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = merge_params(base[key], value) if is_section else value
    return merged


def scratch_project(repo: Path, root: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the project's tracked (and untracked, not ignored) files to `root`; git-commit them.

    `params`, when given, overrides params.yaml section by section (DVC needs every key
    dvc.yaml names, so the project's own file is the base).
    """
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        source = repo / name
        if source.is_file() and not name.startswith("benchmarks/results/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    shutil.rmtree(root / "artifacts", ignore_errors=True)  # committed metric files included
    if params is not None:
        import yaml

        base = yaml.safe_load((root / "params.yaml").read_text())
        merged = merge_params(base, params)
        (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    env = project_environment(root)
    git = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return root


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path | None = None) -> float:
    """Wall seconds of `command` run to completion; raises with its output tail if it fails."""
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if log is not None:
        log.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{tail}")
    return seconds


def best_of(runs: int, command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Fastest of `runs` timings of `command`."""
    return min(timed(command, cwd, env) for _ in range(runs))


def stage_timings(root: Path) -> dict[str, dict[str, float]]:
    """The timing splits the stage processes wrote (`artifacts/timings/*.json`)."""
    folder = root / "artifacts" / "timings"
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def measure_pipeline(
    repo: Path,
    workdir: Path,
    params: dict[str, Any] | None = None,
    log_dir: Path | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run the four measurements of the module docstring; return the `pipeline` results.

    `repeats`: timings of the empty flow, the Prefect import and `dvc repro` (best counts).
    """
    root = scratch_project(repo, workdir / "project", params)
    return measure_project_pipeline(root, log_dir or workdir, repeats)


def measure_project_pipeline(
    root: Path, logs: Path, repeats: int = 3, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """`measure_pipeline` on a scratch project made by `scratch_project` that no pipeline has
    run in yet; leaves it after the no-op run (stages built, a champion promoted).

    `env`: the commands' environment; by default a user's shell in the project
    (`project_environment`: Prefect in ephemeral mode, a temporary API per flow run). With
    PREFECT_API_URL in it the flows record to that server and no temporary one starts."""
    env = env or project_environment(root)
    rlhf = str(Path(sys.executable).parent / "rlhf")
    logs.mkdir(parents=True, exist_ok=True)

    total_s = timed([rlhf, "run"], root, env, logs / "pipeline_first_run.log")
    timings = stage_timings(root)
    compute_s = sum(t["compute_s"] for t in timings.values())
    noop_flow_wall_s = timed([rlhf, "run"], root, env, logs / "pipeline_noop_run.log")
    python = sys.executable
    empty_flow_s = best_of(repeats, [python, "-c", EMPTY_FLOW], root, env)
    import_prefect_s = best_of(repeats, [python, "-c", IMPORT_PREFECT], root, env)
    prefect_start_s = max(0.0, empty_flow_s - import_prefect_s)
    dvc = str(Path(sys.executable).parent / "dvc")
    noop_dvc_repro_s = best_of(repeats, [dvc, "repro"], root, env)
    return {
        "total_s": total_s,
        "compute_s": compute_s,
        "overhead_s": total_s - compute_s,
        "overhead_fraction": (total_s - compute_s) / total_s,
        "stages": timings,
        "startup_s": sum(t["startup_s"] for t in timings.values()),
        "tracking_s": sum(t["tracking_s"] for t in timings.values()),
        "noop_flow_wall_s": noop_flow_wall_s,
        "prefect_start_s": prefect_start_s,
        "noop_flow_s": max(0.0, noop_flow_wall_s - prefect_start_s),
        "noop_dvc_repro_s": noop_dvc_repro_s,
    }
