"""What every `rlhf` command shares: the --params option, one-line errors, logging setup."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="The params file to read.", show_default=True)
]
# Libraries that log routine internals at INFO; shown with --verbose only.
QUIET_LOGGERS = ("great_expectations", "mlflow", "alembic", "httpx", "datasets", "urllib3")


def fail(message: str) -> NoReturn:
    """Print `error: <message>` in red on stderr and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def load_params_or_exit(path: Path):
    """The checked params of `path`, or one error line naming the bad key (exit 2)."""
    from rlhf_core.config import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as error:
        fail(str(error))


def configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with `verbose`) on stderr, chatty libraries' routine INFO left out.

    A second call (the stage commands' own, under `rlhf`) adds nothing: logging.basicConfig
    leaves configured handlers alone, and the filter goes on each handler once."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            if quiet_library_info not in handler.filters:
                handler.addFilter(quiet_library_info)


def quiet_library_info(record: logging.LogRecord) -> bool:
    """Drop routine INFO records of chatty libraries (they set their own logger levels)."""
    return record.levelno >= logging.WARNING or not record.name.startswith(QUIET_LOGGERS)
