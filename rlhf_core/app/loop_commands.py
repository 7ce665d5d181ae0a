"""The commands of the feedback loop: `rlhf chat` (talk to a policy) and `rlhf label` (people
compare two answers and vote). Registered on the `rlhf` app by `app/cli.py`; they share the
sampling options, whose defaults are params.yaml's `evaluate.sampling`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from rlhf_core.orchestration.command_support import ParamsOption, fail, load_params_or_exit

TemperatureOption = Annotated[
    float | None,
    typer.Option(help="Sampling temperature > 0 (default: evaluate.sampling in params)."),
]
TopKOption = Annotated[
    int | None,
    typer.Option("--top-k", help="Keep the k likeliest tokens; 0 keeps all (default: params)."),
]
TopPOption = Annotated[
    float | None,
    typer.Option("--top-p", help="Nucleus mass in (0, 1]; 1 keeps all (default: params)."),
]
MaxNewTokensOption = Annotated[
    int | None,
    typer.Option("--max-new-tokens", help="Most tokens per answer (default: params)."),
]


def sampling_settings(
    params: Any,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int | None,
) -> Any:
    """params.yaml's `evaluate.sampling` with the flags a person gave on the command line;
    a ValueError names a flag out of range."""
    asked = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
    }
    given = {key: value for key, value in asked.items() if value is not None}
    return dataclasses.replace(params.evaluate.sampling, **given)


def chat(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="champion | candidate (the rlhf-policy version with that alias in the "
            "project's registry) | PATH (a save_pretrained folder). Write ./champion for a "
            "folder of that name.",
        ),
    ] = "champion",
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling: same seed, same replies.")] = 0,
    system: Annotated[
        str | None, typer.Option(help="A system message put before every conversation.")
    ] = None,
    show_prompt: Annotated[
        bool,
        typer.Option(
            "--show-prompt", help="Print the prompt the model reads (template and history)."
        ),
    ] = False,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Chat with the champion policy (or the candidate, or a model folder) in the terminal.

    Replies stream as they are generated and stop at every end id of the model. The history
    is kept across turns; when it no longer fits in the model's context the oldest turns are
    dropped (never the system message) with a notice. Type /reset to clear the history,
    /exit or Ctrl-D to quit; Ctrl-C stops a reply and keeps the session. The registry is the
    project's tracking store (MLFLOW_TRACKING_URI, else mlflow.db beside params.yaml);
    weights load as safetensors only, trust_remote_code as model.trust_remote_code says.
    Exits 2 with one line when there is no such model.
    """
    import readline  # noqa: F401 (input() edits the line and recalls earlier ones in a terminal)
    import tempfile

    from rlhf_core.chat import HELP_LINE, chat_session, describe_sampling, load_chat_model
    from rlhf_core.config import Params
    from rlhf_core.devices import resolve_device

    params_obj = load_params_or_exit(params_path) if params_path.is_file() else Params()
    try:
        settings = sampling_settings(params_obj, temperature, top_k, top_p, max_new_tokens)
        device = resolve_device(params_obj.compute)
    except ValueError as error:
        fail(str(error))
    with tempfile.TemporaryDirectory(prefix="rlhf-chat-") as scratch:
        try:
            loaded = load_chat_model(
                model,
                params_path.resolve().parent,
                Path(scratch),
                trust_remote_code=params_obj.model.trust_remote_code,
            )
        except ValueError as error:
            fail(str(error))
        loaded.model.to(device)
        typer.echo(f"Model: {loaded.description}")
        typer.echo(f"Sampling: {describe_sampling(settings, seed)}")
        typer.echo(f"Type a message; {HELP_LINE}")
        chat_session(
            loaded,
            settings,
            seed=seed,
            system=system,
            read_line=input,
            write=lambda text: typer.echo(text, nl=False),
            show_prompt=show_prompt,
        )


def label(
    models: Annotated[
        str | None,
        typer.Option(
            help="Two models to compare, comma-separated: champion,candidate (the default; "
            "the rlhf-policy versions with those aliases) or PATHs of save_pretrained folders.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Compare two samples of one model instead: champion | candidate | PATH.",
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            help="eval (the project's validated held-out prompts) or a prompts FILE "
            "(.jsonl, .json, .csv, .parquet); people can also type their own in the page.",
        ),
    ] = "eval",
    host: Annotated[
        str, typer.Option(help="Interface to serve on; 0.0.0.0 lets other machines vote.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8765,
    annotator_required: Annotated[
        bool,
        typer.Option("--annotator-required", help="Refuse votes without an annotator id."),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Votes per batch file written to data/incoming/ (the rest when it stops).",
            min=1,
        ),
    ] = 20,
    votes_per_pair: Annotated[
        int,
        typer.Option(
            help="Annotators each pair from the prompt set is shown to (2+ measures their "
            "agreement).",
            min=1,
        ),
    ] = 2,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling and of the sides.")] = 0,
    params_path: ParamsOption = Path("params.yaml"),
) -> None:
    """Serve a page where people compare two answers to a prompt and vote (A, B, tie, both bad),
    optionally writing a better answer.

    Which model wrote which side is hidden until the vote. Every vote is appended to
    data/labels/votes.jsonl (synced to disk) before the page says saved; "A"/"B" votes and
    written answers become preference rows (source rlhf-label, annotator, created_at) that
    go to data/incoming/ in batches of --batch-size votes and when the server stops, where
    the retrain deployment ingests them. A restart writes the votes a crash left unbatched.
    The page shows a live tally: the candidate's win rate over the champion with a 95%
    interval, and annotators' agreement. Exits 2 with one line when a model or the prompts
    file cannot be loaded.
    """
    from rlhf_core.app.label_page import LabelOptions, run_label
    from rlhf_core.config import Params

    params_obj = load_params_or_exit(params_path) if params_path.is_file() else Params()
    if models is not None and model is not None:
        fail("Pass --models A,B to compare two models or --model M to sample one twice, not both.")
    listed = (models or "champion,candidate").split(",")
    choices = (model,) if model is not None else tuple(choice.strip() for choice in listed)
    if len(choices) > 1 and (len(choices) != 2 or not all(choices) or choices[0] == choices[1]):
        fail(f"--models takes two different models separated by a comma, got {models!r}.")
    options = LabelOptions(
        choices, prompts, host, port, annotator_required, batch_size, votes_per_pair, seed
    )
    try:
        sampling = sampling_settings(params_obj, temperature, top_k, top_p, max_new_tokens)
        run_label(options, sampling, params_obj, params_path.resolve().parent, typer.echo)
    except (ValueError, FileNotFoundError, OSError) as error:
        fail(str(error))
