"""`rlhf label`: a web page where people compare two answers to a prompt and vote.

The page and its JSON API (`create_app`) over a `LabelSession` (label_session.py: the pairs,
the votes, the tally), and the command's body (`run_label`). Each vote's preference rows
reach `data/incoming/` in batches (`rlhf_core.data.votes`), where the retrain deployment
ingests them. The server is FastAPI on uvicorn, on the loopback interface unless told
otherwise. The page posts JSON (no HTML forms); bad input is an HTTP 4xx whose `error`
sentence the page shows.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from rlhf_core.app.label_assets import PAGE
from rlhf_core.app.label_session import LabelError, LabelSession, Messages, Writer
from rlhf_core.config.data import ValidationSettings
from rlhf_core.config.training import SamplingSettings
from rlhf_core.data.votes import VoteJournal, quarantine_reasons

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 4 * 2**20  # a request body; texts are held to max_chars on top of it


# --------------------------------------------------------------------------------------------
# The web application
# --------------------------------------------------------------------------------------------


def create_app(session: LabelSession) -> FastAPI:
    """The page and its JSON API over `session`; the votes not yet in a batch are written as
    one when the server stops."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        session.journal.flush(force=True)

    app = FastAPI(title="rlhf label", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_REQUEST_BYTES):
            return _error(
                413, f"The request is over {MAX_REQUEST_BYTES // 2**20} MiB: shorten the texts."
            )
        return await call_next(request)

    @app.exception_handler(LabelError)
    async def label_error(_request: Request, error: LabelError) -> JSONResponse:
        return _error(error.status, str(error))

    @app.exception_handler(RequestValidationError)
    async def not_json(_request: Request, _error_: RequestValidationError) -> JSONResponse:
        return _error(400, "The request must be a JSON object; reload the page.")

    @app.exception_handler(Exception)
    async def failed(_request: Request, error: Exception) -> JSONResponse:
        # A full disk, a model that fails: the person must see that it did not work.
        log.exception("rlhf label could not answer a request")
        return _error(
            500,
            f"The server failed ({type(error).__name__}: {error}); what you did last may not "
            "be saved: see the terminal running rlhf label.",
        )

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/config")
    def config() -> dict:
        return {
            "mode": session.mode,
            "annotator_required": session.annotator_required,
            "prompt_set": bool(session.prompts),
        }

    @app.post("/api/comparison")
    def comparison(body: dict) -> dict:
        typed = body.get("prompt")
        if typed is not None and not isinstance(typed, str):
            raise LabelError(400, "The prompt must be text.")
        pair = session.comparison(_text(body, "annotator"), typed)
        return {
            "id": pair.id,
            "prompt": pair.prompt,
            "answer_a": pair.answer_a,
            "answer_b": pair.answer_b,
        }

    @app.post("/api/vote")
    def vote(body: dict) -> dict:
        better = body.get("better_answer")
        if better is not None and not isinstance(better, str):
            raise LabelError(400, "The better answer must be text.")
        return session.vote(
            _text(body, "comparison_id"), _text(body, "verdict"), _text(body, "annotator"), better
        )

    @app.get("/api/tally")
    def tally() -> dict:
        return session.tally()

    return app


def _text(body: dict, key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise LabelError(400, f"{key} must be text.")
    return value


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelOptions:
    """What `rlhf label` was asked for (see its --help)."""

    models: tuple[str, ...]  # two choices to compare, or one to sample twice
    prompts: str  # "eval" or a prompts file
    host: str
    port: int
    annotator_required: bool
    batch_size: int
    votes_per_pair: int
    seed: int


def load_prompt_set(spec: str, root: Any, validation: ValidationSettings) -> list[Messages]:
    """The prompts to draw from: `eval` is the project's validated held-out prompts
    (data/validated/eval_prompts; none when they are not built yet), anything else a
    prompts file in any format `rlhf validate` reads. Rows validation would refuse are
    left out.

    Raises:
        ValueError, FileNotFoundError: the file cannot be read, or holds no usable prompt.
    """
    from rlhf_core.data.readers import read_records
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.common import load_validated

    if spec == "eval":
        try:
            frame = load_validated(ProjectPaths(root), "eval_prompts")
        except FileNotFoundError:
            return []
    else:
        frame = read_records(spec, "prompts").frame
    prompts = [
        list(row["prompt"])
        for row in frame.to_dict(orient="records")
        if not quarantine_reasons({"prompt": row["prompt"]}, "prompts", validation)
    ]
    if spec != "eval" and not prompts:
        raise ValueError(
            f"{spec} holds no usable prompt (each row needs a `prompt`: a text or messages "
            "ending with a user message); check it with `rlhf validate --kind prompts`."
        )
    return prompts


def check_port_free(host: str, port: int) -> None:
    """Raise a ValueError naming the address when nothing can listen on `host`:`port`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"Cannot serve on {host}:{port} ({error.strerror}); pass another --port or "
                "--host, or stop what uses it."
            ) from None


def run_label(
    options: LabelOptions, sampling: SamplingSettings, params: Any, root: Any, echo
) -> None:
    """Load the models, finish what a crash left in the votes log, and serve the page until
    Ctrl-C; the votes not yet in a batch are written as one at the end.

    Raises:
        ValueError: the address is taken, a model cannot be loaded, or the prompts file
            cannot be read.
    """
    import tempfile

    import uvicorn

    from rlhf_core.chat import load_chat_model
    from rlhf_core.devices import resolve_device
    from rlhf_core.paths import ProjectPaths

    check_port_free(options.host, options.port)  # before minutes of model loading
    root = Path(root)
    paths = ProjectPaths(root)
    validation = params.validation_for("preference")
    prompts = load_prompt_set(options.prompts, root, validation)
    if not prompts:
        echo(
            "No validated eval prompts yet (rlhf stage validate): the page asks for typed prompts."
        )
    journal = VoteJournal(paths.labels_dir, paths.incoming_dir, options.batch_size)
    recovered = journal.recover()
    if recovered is not None:
        echo(f"Wrote the votes an earlier run left unbatched to {recovered}")
    device = resolve_device(params.compute)
    with tempfile.TemporaryDirectory(prefix="rlhf-label-") as scratch:
        writers = []
        for choice in options.models:
            loaded = load_chat_model(
                choice, root, Path(scratch), trust_remote_code=params.model.trust_remote_code
            )
            loaded.model.to(device)
            writers.append(Writer(choice, loaded))
            echo(f"Model {choice}: {loaded.description}")
        session = LabelSession(
            writers,
            sampling,
            prompts,
            journal,
            validation,
            seed=options.seed,
            votes_per_pair=options.votes_per_pair,
            annotator_required=options.annotator_required,
        )
        echo(
            f"Votes log: {journal.log_path}; every {options.batch_size} votes go to "
            f"{paths.incoming_dir} as a batch"
        )
        if options.host not in ("127.0.0.1", "localhost", "::1"):
            echo(f"Serving on {options.host}: anyone who reaches this address can vote.")
        echo(f"Open http://{options.host}:{options.port}/ (Ctrl-C stops the server)")
        try:
            uvicorn.run(
                create_app(session), host=options.host, port=options.port, log_level="warning"
            )
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on, after its shutdown
            echo("Ctrl-C: the server stopped.")
    pending = journal.pending()
    echo(f"{len(journal.votes())} votes in the log, {pending} not yet in a batch.")
