"""`make bench` / `python -m benchmarks.run`: every measurement, then the results files.

1. the machine's fp32 matmul peak
2. the shared workload (tokenizer, initial weights, data) in a scratch folder
3. per stage, ours and TRL's in fresh processes, alternating which goes first (each forked
   from a server that imported the libraries both sides share once, so no measurement waits
   for torch and transformers to import again)
4. our PPO: time split and generation speed
5. the demo pipeline's orchestration overhead
6. benchmarks/results/latest.json + latest.md, and the table in README.md
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import platform
import subprocess
import tempfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.settings import (
    QUICK,
    QUICK_PIPELINE_PARAMS,
    TRL_STAGES,
    BenchSettings,
    real_model_settings,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
TRL_PPO_NOTE = (
    "TRL {version} ships no PPO trainer (it was removed from TRL; its online trainers are "
    "GRPO and RLOO), so PPO has no TRL column."
)

app = typer.Typer(add_completion=False, help=__doc__)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _git_commit() -> str:
    completed = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


# Imported once by the workers' fork server; each measurement is a fresh process forked from it.
# Only what both sides import: TRL's workers import TRL themselves, so ours never carries it.
WORKER_PRELOAD = ["torch", "transformers", "datasets", "peft", "benchmarks.worker"]


def _worker_context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def _worker_process(argv: list[str], log: str) -> None:
    """The measurement process: output to its log, then `benchmarks.worker.main`."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    os.chdir(REPO)
    from benchmarks.worker import main

    main(argv)


def run_worker(stage: str, impl: str, workspace: Path, logs: Path) -> dict[str, Any]:
    """One measurement in a fresh process (`benchmarks.worker`); its output goes to a log.

    The process is forked from a server that has imported torch, transformers, datasets and
    peft (`WORKER_PRELOAD`): a fresh address space and memory high-water mark per measurement,
    without 5-10 s of imports each. The worker's memory baseline is taken after its imports,
    so the shared pages count on neither side."""
    out = workspace / f"{stage}_{impl}.json"
    log = logs / f"{stage}_{impl}.log"
    argv = [stage, impl, str(workspace), str(out)]
    process = _worker_context().Process(target=_worker_process, args=(argv, str(log)))
    process.start()
    process.join()
    if process.exitcode != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{impl} {stage} failed (exit {process.exitcode}, log {log}):\n{tail}")
    return json.loads(out.read_text())


def _faster(first: dict | None, second: dict) -> dict:
    return second if first is None or second["tokens_per_s"] > first["tokens_per_s"] else first


def measure_training(
    settings: BenchSettings, workspace: Path, logs: Path, with_trl: bool, repeats: int, peak: float
) -> dict[str, Any]:
    """Ours against TRL per stage, alternating which goes first; best of `repeats` per side."""
    from rich.console import Console

    from benchmarks.report import stage_summary

    console = Console(stderr=True)
    stages: dict[str, Any] = {}
    for index, stage in enumerate(TRL_STAGES):
        best: dict[str, dict | None] = {"ours": None, "trl": None}
        for repeat in range(repeats):
            order = ["ours", "trl"] if (index + repeat) % 2 == 0 else ["trl", "ours"]
            for impl in order:
                if impl == "trl" and not with_trl:
                    continue
                # No live spinner while a measurement runs: on 2 cores its refreshes cost the
                # measured process several percent.
                console.print(f"{stage:>7} {impl:>4}: run {repeat + 1} of {repeats} ...")
                record = run_worker(stage, impl, workspace, logs)
                console.print(
                    f"{stage:>7} {impl:>4}: {record['tokens_per_s']:8.0f} tokens/s, "
                    f"peak {record['peak_mem_mb']:6.0f} MB, final loss {record['final_loss']:.4f}"
                )
                best[impl] = _faster(best[impl], record)
        stages[stage] = stage_summary(best["ours"], best["trl"], peak)
    return stages


def measure_ppo(workspace: Path, logs: Path, peak: float, trl_version: str | None) -> dict:
    """Our PPO: tokens/s, utilisation, time split and generation speed (no TRL counterpart)."""
    from rich.console import Console

    Console(stderr=True).print("    ppo ours: ...")
    record = run_worker("ppo", "ours", workspace, logs)
    return {
        "ours_tokens_per_s": record["tokens_per_s"],
        "trl_tokens_per_s": None,
        "ratio": None,
        "utilisation": record["flops_per_s"] / (peak * 1e9),
        "ours_peak_mem_mb": record["peak_mem_mb"],
        "trl_peak_mem_mb": None,
        "ours_final_loss": record["final_loss"],
        "trl_note": TRL_PPO_NOTE.format(version=trl_version or "(not installed)"),
        "time_split_s": record["time_split_s"],
        "time_split_fraction": record["time_split_fraction"],
        "generation": record["generation"],
        "ours": record,
    }


def run_benchmarks(
    settings: BenchSettings,
    out_dir: Path,
    *,
    with_trl: bool = True,
    with_pipeline: bool = True,
    pipeline_params: dict[str, Any] | None = None,
    repeats: int = 1,
    name: str = "latest",
) -> dict[str, Any]:
    """Every measurement; returns the results dict (also written to `out_dir` as
    `<name>.json` and `<name>.md`)."""
    from rich.console import Console

    from benchmarks.hardware import configure_threads, matmul_peak_gflops
    from benchmarks.pipeline import measure_pipeline
    from benchmarks.report import evaluate_targets, markdown
    from benchmarks.workload import build_workspace

    console = Console(stderr=True)
    trl_version = _version("trl")
    if with_trl and importlib.util.find_spec("trl") is None:
        raise RuntimeError(
            "TRL is not installed: `pip install -e '.[bench]'` (what `make bench` does), "
            "or pass --no-trl to measure ours alone."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    threads = configure_threads(settings.threads)
    console.print("measuring the fp32 matmul peak ...")  # no spinner: it would share the CPU
    peak = matmul_peak_gflops(settings.matmul_size)
    console.print(f"fp32 matmul peak: {peak:.0f} GFLOP/s on {threads} threads")
    results: dict[str, Any] = {
        "schema": 1,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {
            "cpu": _cpu_name(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "trl": trl_version if with_trl else None,
        },
        "settings": settings.to_dict(),
        "matmul_peak_gflops": peak,
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as scratch:
        workspace = Path(scratch) / "workspace"
        with console.status("building the shared workload"):
            results["workload"] = build_workspace(settings, workspace)
        stages = measure_training(settings, workspace, logs, with_trl, repeats, peak)
        stages["ppo"] = measure_ppo(workspace, logs, peak, trl_version if with_trl else None)
        results["stages"] = stages
        if with_pipeline:
            console.print("demo pipeline: first run, no-op run, Prefect, dvc repro ...")
            results["pipeline"] = measure_pipeline(
                REPO,
                Path(scratch) / "pipeline",
                pipeline_params,
                logs,
                repeats=1 if pipeline_params is not None else 3,  # a quick check: once
            )
    results["matmul_peak_gflops_after"] = matmul_peak_gflops(settings.matmul_size)
    results["targets"] = evaluate_targets(results)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(results))
    return results


@app.command()
def main(
    quick: Annotated[
        bool, typer.Option(help="Tiny model and data: checks the harness in seconds.")
    ] = False,
    real: Annotated[
        Path | None,
        typer.Option(
            help="Measure this pretrained model (.gguf or safetensors folder) instead of the "
            "from-scratch one; results go to real.json/real.md and the README's real section."
        ),
    ] = None,
    trl: Annotated[
        bool, typer.Option(help="Measure TRL beside ours (needs the bench extra).")
    ] = True,
    pipeline: Annotated[
        bool, typer.Option(help="Measure the demo pipeline's orchestration overhead.")
    ] = True,
    repeats: Annotated[
        int, typer.Option(min=1, help="Runs per side and stage; the fastest counts.")
    ] = 1,
    out: Annotated[Path, typer.Option(help="Folder for the results files.")] = RESULTS_DIR,
    readme: Annotated[bool, typer.Option(help="Rewrite the results table in README.md.")] = False,
) -> None:
    """Benchmark our trainers against TRL and the CPU's peak, and the pipeline's overhead."""
    from benchmarks.report import (
        README_BEGIN,
        README_END,
        REAL_README_BEGIN,
        REAL_README_END,
        update_readme,
    )

    if quick and real is not None:
        typer.secho("error: --quick and --real exclude each other", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    if real is not None and not real.exists():
        typer.secho(f"error: {real}: no such model file or folder", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    settings = QUICK if quick else BenchSettings()
    name, markers = "latest", (README_BEGIN, README_END)
    if real is not None:
        settings, name = real_model_settings(str(real.resolve())), "real"
        markers = (REAL_README_BEGIN, REAL_README_END)
    try:
        results = run_benchmarks(
            settings,
            out,
            with_trl=trl,
            with_pipeline=pipeline and real is None,  # the pipeline's cost is the demo's
            pipeline_params=QUICK_PIPELINE_PARAMS if quick else None,
            repeats=repeats,
            name=name,
        )
    except RuntimeError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    table = (out / f"{name}.md").read_text()
    typer.echo(table)
    typer.echo(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")
    if readme:
        if update_readme(REPO / "README.md", table, *markers):
            typer.echo("updated the results table in README.md")
        else:
            typer.secho("README.md has no bench markers; table not copied", err=True)
    missed = [check["target"] for check in results["targets"] if check["met"] is False]
    if missed:
        typer.secho(f"targets missed: {'; '.join(missed)}", fg=typer.colors.YELLOW, err=True)


if __name__ == "__main__":
    app()
