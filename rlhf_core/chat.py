"""Talk to a policy in the terminal: the conversation's rules and the streamed reply.

`rlhf chat` is the thin edge over this module. The rules are pure functions a test reads
in one go: what a typed line means (`parse_input`), the messages the model reads
(`conversation`), and which old turns to drop when they no longer fit its context
(`fit_history`). The side effects sit at the end: loading the registered champion or
candidate, or a model folder (`load_chat_model`), sampling one reply with its text streamed
as it is generated (`stream_reply`), and the loop of a session (`chat_session`), which reads
and writes through the callables it is given.

A reply samples exactly as `generation.generate` does (the same generation config, every end
id of the model's `generation_config` stops it), so what a person sees in the chat is what
the evaluation and the gate judged.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from rlhf_core.config.training import SamplingSettings
from rlhf_core.generation import (
    _generation_config,
    derived_seed,
    device_of,
    end_token_ids,
    eval_mode,
    pad_and_eos_ids,
    render_prompts,
    truncate_at_eos,
)

Message = dict[str, str]
Messages = list[Message]

CHAMPION_CHOICE = "champion"
CANDIDATE_CHOICE = "candidate"
RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")
# What MLflow answers for a registered model or an alias that does not exist.
_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
HELP_LINE = "/reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply."


# --------------------------------------------------------------------------------------------
# The conversation's rules (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatInput:
    """What one typed line asks for: a message to the model, or a command."""

    kind: Literal["message", "reset", "exit", "empty", "unknown"]
    text: str = ""


def parse_input(line: str) -> ChatInput:
    """The meaning of a typed line.

    `/reset` and `/exit` (or `/quit`) are commands, whatever the case and surrounding space;
    any other line starting with `/` is an unknown command (so a typo is not sent to the
    model as a message); a blank line is nothing; everything else is a message, sent as
    typed apart from the line's surrounding space.
    """
    text = line.strip()
    if not text:
        return ChatInput("empty")
    if text.startswith("/"):
        command = text.split()[0].lower()
        if command == RESET_COMMAND:
            return ChatInput("reset")
        if command in EXIT_COMMANDS:
            return ChatInput("exit")
        return ChatInput("unknown", text)
    return ChatInput("message", text)


def conversation(
    history: Sequence[Message], system: str | None, user_text: str | None = None
) -> Messages:
    """The messages the model reads: the system message (when given and not blank), the
    earlier turns, then the new user message (when given)."""
    messages: Messages = []
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    messages.extend(dict(message) for message in history)
    if user_text is not None:
        messages.append({"role": "user", "content": user_text})
    return messages


@dataclass(frozen=True)
class FittedHistory:
    """The earlier turns that still fit, and how many whole turns were dropped to fit."""

    history: Messages
    dropped_turns: int


def fit_history(
    history: Sequence[Message],
    system: str | None,
    user_text: str,
    prompt_length: Callable[[Messages], int],
    budget: int | None,
) -> FittedHistory:
    """Drop the oldest turns until the prompt for `user_text` fits in `budget` tokens.

    A turn is a user message and the answer to it, so the messages keep alternating as chat
    templates expect; the system message and the new message are never dropped. `budget`
    is the model's context less the reply's `max_new_tokens` (`context_budget`); None means
    no limit. `prompt_length(messages)` counts the rendered prompt's tokens (generation
    prompt included): the template adds role tokens per message, so whole prompts are
    counted, not messages one by one.

    Raises:
        ValueError: the system message and the new message alone are longer than `budget`.
    """
    kept = list(history)
    dropped = 0
    if budget is None:
        return FittedHistory(kept, dropped)
    while prompt_length(conversation(kept, system, user_text)) > budget:
        if not kept:
            length = prompt_length(conversation([], system, user_text))
            raise ValueError(
                f"The message{' and the system message' if system else ''} take {length} "
                f"tokens, more than the {budget} the model can read before its reply; shorten "
                "it or lower --max-new-tokens."
            )
        kept = kept[2:]  # one user message and its answer
        dropped += 1
    return FittedHistory(kept, dropped)


def context_budget(context_length: int | None, max_new_tokens: int) -> int | None:
    """Tokens a prompt may take so that `max_new_tokens` more still fit in the context."""
    if context_length is None:
        return None
    return max(context_length - max_new_tokens, 0)


def truncation_notice(dropped_turns: int) -> str:
    """The one line that says old turns left the history."""
    turns = "turn" if dropped_turns == 1 else "turns"
    return (
        f"(the {dropped_turns} oldest {turns} no longer fit in the model's context and "
        "were dropped from the history)"
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class ChatModel:
    """A loaded policy and what the session says about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    description: str  # name, version and run id, or the folder
    run_id: str | None = None  # the MLflow run that trained a registered model (None: a folder)

    @property
    def context_length(self) -> int | None:
        """Positions the model reads: its `max_position_embeddings`, or the tokenizer's
        `model_max_length` when that is smaller and real (transformers marks "unknown" with
        a huge number); None when neither says."""
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and tokenizer_limit < 10**7:
            limits.append(tokenizer_limit)
        known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
        return min(known) if known else None


def load_chat_model(
    choice: str, project_root: Path, workdir: Path, *, trust_remote_code: bool = False
) -> ChatModel:
    """Load the policy named by `choice`: `champion`, `candidate` or a model folder.

    `champion` and `candidate` are the `rlhf-policy` versions with those aliases in the
    project's registry (the retraining flow sets `candidate` on each version it registers and
    moves `champion` on promotion); their `save_pretrained` folder is downloaded into
    `workdir`. Anything else is a local folder written by `save_pretrained`. Weights load as
    safetensors only (`load_causal_lm`); `trust_remote_code` as params.yaml says.

    Raises:
        ValueError: no version has the alias, the registry does not answer, or the folder
            is missing, not a model or holds no safetensors weights.
    """
    from rlhf_core.models.loading import load_causal_lm

    run_id = None
    if choice in (CHAMPION_CHOICE, CANDIDATE_CHOICE):
        folder, description, run_id = _download_registered(choice, project_root, workdir)
    else:
        folder, description = _model_folder(choice), choice
    try:
        model, tokenizer = load_causal_lm(folder, trust_remote_code=trust_remote_code)
    except OSError as error:  # FileNotFoundError: no safetensors weights in the folder
        raise ValueError(str(error)) from error
    return ChatModel(model, tokenizer, description, run_id)


def _download_registered(alias: str, project_root: Path, workdir: Path) -> tuple[str, str, str]:
    """The local folder of the `rlhf-policy` version with `alias`, its description and the
    run that trained it."""
    from mlflow.exceptions import MlflowException

    from rlhf_core.tracking.registry import (
        POLICY_MODEL,
        current_champion,
        download_model_dir,
        registry_client,
    )

    client = registry_client(project_root)
    try:
        if alias == CHAMPION_CHOICE:
            version = current_champion(client, POLICY_MODEL)
        else:
            version = client.get_model_version_by_alias(POLICY_MODEL, alias)
    except MlflowException as error:
        if error.error_code not in _ABSENT:
            raise ValueError(
                f"Could not read the {alias} of {POLICY_MODEL} from the registry at "
                f"{client.tracking_uri} ({error.error_code}); check that the tracking store "
                "answers (`rlhf ui`) or point MLFLOW_TRACKING_URI at it."
            ) from error
        version = None
    if version is None:
        raise ValueError(
            f"No {POLICY_MODEL} version is the {alias} in the registry at "
            f"{client.tracking_uri} yet; run `rlhf run` (or `rlhf retrain`) to train and "
            "register one, or pass --model PATH to a model folder."
        )
    folder = download_model_dir(client, version, workdir / f"{POLICY_MODEL}-v{version.version}")
    stage = version.tags.get("stage")
    trained_by = f", {stage}" if stage else ""
    description = f"{POLICY_MODEL} v{version.version} (@{alias}{trained_by}, run {version.run_id})"
    return str(folder), description, version.run_id


def _model_folder(choice: str) -> str:
    """`choice` as a model folder, or a ValueError saying why it is not one."""
    folder = Path(choice).expanduser()
    if not folder.exists():
        raise ValueError(
            f"Model folder {choice} does not exist; pass --model champion, candidate or the "
            "path of a folder written by save_pretrained."
        )
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(
            f"{choice} is not a model folder (no config.json in it); pass a folder written "
            "by save_pretrained."
        )
    return str(folder)


# --------------------------------------------------------------------------------------------
# One reply, streamed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A sampled reply.

    Attributes:
        text: the reply without special tokens, stripped of surrounding space.
        ended: the model ended it with an end id (not cut by `max_new_tokens`).
        stopped: Ctrl-C stopped it; `text` is what was generated until then.
        tokens: tokens generated, the end id included.
    """

    text: str
    ended: bool
    stopped: bool
    tokens: int


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """Token ids of `messages` plus the assistant's generation prompt (`render_prompts`)."""
    return render_prompts(tokenizer, [messages])[0]


def stream_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    seed: int,
    on_text: Callable[[str], None],
    *,
    stop: threading.Event | None = None,
) -> Reply:
    """Sample one reply to `prompt_ids`, handing its text to `on_text` while it is generated.

    transformers' `TextStreamer` cuts the decoded text into pieces at word ends, so a
    piece never splits a word or a multi-byte character. Sampling is `generate`'s: the same
    generation config from `settings`, every end id of the tokenizer and of the model's
    `generation_config` stops the reply, torch's RNG seeded with `seed` in a fork (the
    caller's RNG state is left alone).

    Ctrl-C (SIGINT) while the reply is generated stops it after the token being generated,
    and is not raised: the reply so far comes back with `stopped=True`, every word of it
    handed to `on_text`, so a session outlives an answer that runs away. (A KeyboardInterrupt
    raised in the middle of a step or of a write would lose the words held back, and
    leave the history holding words the person never saw.) `stop`, when given, is the event
    Ctrl-C sets; set before the call, it stops the reply after its first token.
    """
    pad_id, _ = pad_and_eos_ids(tokenizer)
    eos_ids = end_token_ids(tokenizer, model)
    streamer = _PieceStreamer(tokenizer, on_text)
    stop = threading.Event() if stop is None else stop
    device = device_of(model)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, P)
    rng_devices = [device] if device.type == "cuda" else []
    with (
        eval_mode(model),
        torch.inference_mode(),
        torch.random.fork_rng(devices=rng_devices),
        _ctrl_c_sets(stop),
    ):
        torch.manual_seed(seed)
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=_generation_config(settings, pad_id, eos_ids),
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
            streamer=streamer,
        )
    response_ids, ended = truncate_at_eos(streamer.response_ids, eos_ids)
    text = tokenizer.decode(response_ids, skip_special_tokens=True).strip()
    return Reply(text=text, ended=ended, stopped=stop.is_set(), tokens=len(response_ids))


@contextmanager
def _ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) sets `event` instead of raising KeyboardInterrupt.

    Python runs signal handlers in the main thread only; elsewhere the block changes
    nothing (and no Ctrl-C reaches it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _signal, _frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next step once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _PieceStreamer(TextStreamer):
    """A `TextStreamer` that hands each piece of text to a callable (not `print`) and keeps
    the reply's token ids, which a stopped reply has no other record of."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.response_ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.response_ids.extend(int(token) for token in value.reshape(-1).tolist())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


# --------------------------------------------------------------------------------------------
# A session
# --------------------------------------------------------------------------------------------


def chat_session(
    chat_model: ChatModel,
    settings: SamplingSettings,
    *,
    seed: int,
    system: str | None,
    read_line: Callable[[str], str],
    write: Callable[[str], None],
    show_prompt: bool = False,
) -> Messages:
    """Read messages with `read_line` and write streamed replies with `write` until `/exit`
    or end of input (EOFError); returns the history at the end.

    The reply to the n-th message is sampled with seed `derived_seed(seed, "chat", n)`, so
    the same seed and the same messages give the same session. Ctrl-C while waiting for a
    message only says how to quit; Ctrl-C once a message is sent stops its reply
    (`stream_reply`; after the first token when it comes before the reply begins) and the
    history keeps what the reply said. With `show_prompt`, the rendered prompt (special
    tokens included) is written before each reply.
    """
    budget = context_budget(chat_model.context_length, settings.max_new_tokens)
    history: Messages = []
    replies = 0
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            write("\n")
            return history
        except KeyboardInterrupt:
            write(f"\n({HELP_LINE})\n")
            continue
        typed = parse_input(line)
        if typed.kind == "exit":
            return history
        if typed.kind == "reset":
            history = []
            write("(history cleared)\n")
            continue
        if typed.kind == "unknown":
            write(f"(unknown command {typed.text.split()[0]}; {HELP_LINE})\n")
            continue
        if typed.kind == "empty":
            continue
        stop = threading.Event()
        with _ctrl_c_sets(stop):  # from here until the history holds the reply
            history = _answer(
                chat_model,
                settings,
                Turn(history, system, typed.text, derived_seed(seed, "chat", replies), budget),
                write,
                show_prompt=show_prompt,
                stop=stop,
            )
        replies += 1


@dataclass(frozen=True)
class Turn:
    """What one reply is made from: the history so far, the system and the new message, the
    reply's seed and the prompt's token budget (`context_budget`)."""

    history: Messages
    system: str | None
    user_text: str
    seed: int
    budget: int | None


def _answer(
    chat_model: ChatModel,
    settings: SamplingSettings,
    turn: Turn,
    write: Callable[[str], None],
    *,
    show_prompt: bool,
    stop: threading.Event,
) -> Messages:
    """Write the reply to `turn.user_text` as it is generated; the history that follows."""
    tokenizer = chat_model.tokenizer

    def prompt_length(messages: Messages) -> int:
        return len(render_prompt(tokenizer, messages))

    try:
        fitted = fit_history(turn.history, turn.system, turn.user_text, prompt_length, turn.budget)
    except ValueError as error:
        write(f"({error})\n")
        return list(turn.history)
    if fitted.dropped_turns:
        write(truncation_notice(fitted.dropped_turns) + "\n")
    prompt_ids = render_prompt(tokenizer, conversation(fitted.history, turn.system, turn.user_text))
    if show_prompt:
        shown = tokenizer.decode(prompt_ids, skip_special_tokens=False)
        write(f"--- prompt ({len(prompt_ids)} tokens) ---\n{shown}\n--- end of prompt ---\n")
    write("model> ")
    reply = stream_reply(
        chat_model.model, tokenizer, prompt_ids, settings, turn.seed, write, stop=stop
    )
    write("\n")
    if reply.stopped:
        write("(stopped)\n")
    elif not reply.ended:
        write(f"(cut at {settings.max_new_tokens} new tokens)\n")
    return [
        *fitted.history,
        {"role": "user", "content": turn.user_text},
        {"role": "assistant", "content": reply.text},
    ]


def describe_sampling(settings: SamplingSettings, seed: int) -> str:
    """The sampling settings of a session, in one line."""
    if not settings.do_sample:
        how = "greedy"
    else:
        top_k = "all" if settings.top_k == 0 else str(settings.top_k)
        how = f"temperature {settings.temperature:g}, top-k {top_k}, top-p {settings.top_p:g}"
    return f"{how}, at most {settings.max_new_tokens} new tokens, seed {seed}"
