"""The `rlhf` command line: the outermost edge of the product.

Heavy libraries (torch, transformers, great_expectations) are imported inside the commands
that need them, so `rlhf --help` and quick commands start in well under a second.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from rlhf_core import __version__

app = typer.Typer(
    name="rlhf",
    help="Reproducible RLHF: data validation, SFT, reward models, DPO and PPO as a tracked "
    "pipeline. Run from the project root (where params.yaml and dvc.yaml live).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Build, inspect and convert models.", no_args_is_help=True)
stage_app = typer.Typer(
    help="Run one pipeline stage (DVC calls exactly these; see dvc.yaml).", no_args_is_help=True
)
app.add_typer(model_app, name="model")
app.add_typer(stage_app, name="stage")

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="The params file to read.", show_default=True)
]
KINDS_HELP = "sft | preference | ranked | prompts"
# Libraries that log routine internals at INFO; shown with --verbose only.
QUIET_LOGGERS = ("great_expectations", "mlflow", "alembic", "httpx", "datasets", "urllib3")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load_params(path: Path):
    from rlhf_core.config import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as error:
        _fail(str(error))


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_library_info)


def _quiet_library_info(record: logging.LogRecord) -> bool:
    """Drop routine INFO records of chatty libraries (they set their own logger levels)."""
    return record.levelno >= logging.WARNING or not record.name.startswith(QUIET_LOGGERS)


@app.command()
def version() -> None:
    """Print the installed version."""
    typer.echo(__version__)


@app.command()
def params(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Check params.yaml against the schema and print every resolved value (defaults included)."""
    import yaml

    resolved = _load_params(params_path)
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
        _fail(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    settings = _load_params(params_path).data.validation if params_path.is_file() else None
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
    from rlhf_core.data.validation import ValidationSettings, validate_files

    tokenizer = None
    if tokenizer_path is not None:
        from rlhf_core.models.loading import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_path))
    try:
        report = validate_files(
            [str(p) for p in paths], kind, out, settings or ValidationSettings(), tokenizer
        )
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
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
) -> None:
    """Validate new preference files and merge their valid rows into the store.

    Rows are deduplicated by content hash and carry provenance (source file and line,
    ingestion time, file hash). Files are archived in the store, never deleted; re-ingesting
    a file adds nothing. Then `dvc add` versions the store (skipped outside a DVC project).
    Exits 1 if any file was rejected by the valid-fraction threshold, 2 if `dvc add` failed
    (the ingested rows stay in the store).
    """
    from rlhf_core.data.store import ingest_files

    settings = _load_params(params_path).data.validation if params_path.is_file() else None
    try:
        results = ingest_files(files, store, kind=kind, settings=settings)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    for result in results:
        if result.status == "already_ingested":
            typer.echo(f"{result.file}: already ingested (sha256 {result.sha256[:12]}), skipped")
        else:
            typer.echo(
                f"{result.file}: {result.status}: {result.total} rows, {result.valid} valid, "
                f"{result.quarantined} quarantined, {result.added} added, "
                f"{result.duplicates} duplicates (report: {result.report_dir})"
            )
    tracking_error = _track_store(store) if dvc_add else None
    _announce_ingest(store, results)
    if tracking_error is not None:
        _fail(tracking_error)
    if any(result.status == "rejected" for result in results):
        raise typer.Exit(code=1)


def _track_store(store: Path) -> str | None:
    """Version the store with `dvc add` and say what happened; DVC's error, if it failed."""
    from rlhf_core.orchestration import StoreTrackingError, track_store

    try:
        typer.echo(track_store(store).message)
    except StoreTrackingError as error:
        return str(error)
    return None


def _announce_ingest(store: Path, results) -> None:
    """Tell a served retrain deployment that new rows arrived (no-op without a Prefect API)."""
    from rlhf_core.orchestration import emit_ingested_event

    if emit_ingested_event(store, results) is not None:
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
        _fail(str(error))
    typer.echo(json.dumps(summary, indent=2))


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
        _fail(str(error))
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


@stage_app.command("prepare")
def stage_prepare(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the raw data sets (demo task or user files) and the base model to fixed paths."""
    from rlhf_core.stages.prepare import run_prepare

    summary = _run_stage(run_prepare, params_path, "prepare")
    typer.echo(json.dumps(summary, indent=2))


@stage_app.command("validate")
def stage_validate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Validate every raw data set into data/validated/<set> (report, rows, quarantine, docs)."""
    from rlhf_core.stages.validate import run_validate

    summary = _run_stage(run_validate, params_path, "validate")
    typer.echo(json.dumps(summary, indent=2))
    if not summary["passed"]:
        raise typer.Exit(code=1)


@stage_app.command("sft")
def stage_sft(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Supervised fine-tuning of the base model on the SFT set (completion-only loss)."""
    from rlhf_core.stages.sft import run_sft

    _run_training_stage(params_path, lambda p: run_sft(p.sft, data=p.data, seed=p.seed), "sft")


@stage_app.command("reward")
def stage_reward(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Reward model from the SFT model: Bradley–Terry on pairs, Plackett–Luce on rankings."""
    from rlhf_core.stages.reward import run_reward

    _run_training_stage(
        params_path, lambda p: run_reward(p.reward, data=p.data, seed=p.seed), "reward"
    )


@stage_app.command("dpo")
def stage_dpo(params_path: ParamsOption = Path("params.yaml")) -> None:
    """DPO (or IPO, hinge, conservative DPO, SimPO) from the SFT model on preference pairs."""
    from rlhf_core.stages.dpo import run_dpo

    _run_training_stage(
        params_path, lambda p: run_dpo(p.policy.dpo, data=p.data, seed=p.seed), "dpo"
    )


@stage_app.command("ppo")
def stage_ppo(params_path: ParamsOption = Path("params.yaml")) -> None:
    """PPO (or GRPO/RLOO) against the reward model with a KL penalty to the SFT model."""
    from rlhf_core.stages.ppo import run_ppo

    _run_training_stage(
        params_path, lambda p: run_ppo(p.policy.ppo, data=p.data, seed=p.seed), "ppo"
    )


@stage_app.command("evaluate")
def stage_evaluate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Compare SFT, each aligned policy and best-of-n on held-out prompts."""
    from rlhf_core.stages.evaluate import run_evaluate

    _run_training_stage(
        params_path,
        lambda p: run_evaluate(
            p.evaluate, algorithms=p.policy.algorithms, data=p.data, seed=p.seed
        ),
        "evaluate",
    )


def _run_training_stage(params_path: Path, stage_function, stage: str) -> None:
    metrics = _run_stage(stage_function, params_path, stage)
    typer.echo(json.dumps(metrics, indent=2, default=str))


def _run_stage(stage_function, params_path: Path, stage: str):
    """Run a stage function; its timing split goes to artifacts/timings/<stage>.json."""
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.timing import record_stage_timing

    params_obj = _load_params(params_path)
    timings_dir = ProjectPaths(params_path.parent).timings_dir
    try:
        result, _ = record_stage_timing(stage, timings_dir, lambda: stage_function(params_obj))
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    return result


@app.command()
def run(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Run the whole pipeline as a Prefect flow: every DVC stage in order (up-to-date ones are
    skipped), one MLflow parent run, a summary, then the quality gate and promotion."""
    from rlhf_core.orchestration import run_pipeline

    _load_params(project / "params.yaml")
    try:
        summary = run_pipeline(project)
    except RuntimeError as error:
        _fail(str(error))
    _print_where_to_look(summary)


@app.command()
def retrain(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Ingest new files from data/incoming, rerun what they touch, promote only if better."""
    from rlhf_core.orchestration import run_retrain

    _load_params(project / "params.yaml")
    try:
        result = run_retrain(project)
    except RuntimeError as error:
        _fail(str(error))
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def serve(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """Serve the retrain deployment: on the cron schedule of params.yaml and whenever `rlhf
    ingest` adds rows, one run at a time. Uses PREFECT_API_URL, or starts a local server."""
    from rlhf_core.orchestration import serve as serve_deployments

    params_obj = _load_params(project / "params.yaml")
    try:
        serve_deployments(project, params_obj)
    except (RuntimeError, ValueError) as error:
        _fail(str(error))


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
    from rlhf_core.orchestration import UIError, open_ui

    try:
        code = open_ui(project, port, open_browser)
    except UIError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=error.exit_code) from None
    except RuntimeError as error:  # TrackingStoreError: the store does not answer
        _fail(str(error))
    raise typer.Exit(code=code)


@app.command()
def demo(
    project: Annotated[Path, typer.Option(help="Project root (dvc.yaml, params.yaml).")] = Path(
        "."
    ),
) -> None:
    """The main job on the embedded offline demo: `rlhf run` with a summary and where to look."""
    run(project)


def _print_where_to_look(summary: dict) -> None:
    from rlhf_core.stages.summary import print_summary

    print_summary(summary)


def main() -> None:
    """The `rlhf` console script: `rlhf stage ...` goes to a warm stage server when the
    pipeline flow runs one (`rlhf_core.warm_stages`), everything else runs here."""
    import sys

    from rlhf_core.warm_stages import delegate

    if sys.argv[1:2] == ["stage"] and (code := delegate(sys.argv[1:])) is not None:
        raise SystemExit(code)
    app()
