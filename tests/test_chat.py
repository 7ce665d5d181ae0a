"""`rlhf chat`: the conversation's rules, the streamed reply, and the command on a real model
folder and on the champion of a real (sqlite) registry."""

import os
import re
import shutil
import signal

import pytest
from test_tracking_registry import EVALUATION, run_model_stage
from tiny_models import chatty_policy
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.chat import (
    ChatInput,
    ChatModel,
    chat_session,
    context_budget,
    conversation,
    fit_history,
    parse_input,
    render_prompt,
    stream_reply,
)
from rlhf_core.config.training import SamplingSettings
from rlhf_core.generation import derived_seed, generate
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.tracking.registry import (
    POLICY_MODEL,
    promote,
    register_candidate,
    registry_client,
)

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
SYSTEM = "You review films."
CHAT_SAMPLING = SamplingSettings(max_new_tokens=24)
PROMPT_BLOCK = re.compile(r"--- prompt \((\d+) tokens\) ---\n(.*?)\n--- end of prompt ---", re.S)


def turn(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A 2-layer Llama with a 64-position context and a BPE tokenizer with our chat template,
    trained for 60 steps on film-word exchanges so that it answers in words and ends its
    answers (as a policy does), saved as save_pretrained writes it (about 2 s)."""
    folder = tmp_path_factory.mktemp("chat") / "policy"
    loss = chatty_policy(folder, positions=64, exchanges=64, words=6, steps=60)
    assert loss < 2.5  # it learnt the words (a uniform guess over 303 tokens: 5.7)
    return folder


@pytest.fixture(scope="module")
def loaded(model_folder):
    model, tokenizer = load_causal_lm(str(model_folder))
    return ChatModel(model, tokenizer, str(model_folder))


def chat(*args, input_text=""):
    """`rlhf chat ARGS` with `input_text` as stdin; no params file, so params' defaults."""
    return runner.invoke(app, ["chat", "--params", "missing-params.yaml", *args], input=input_text)


def prompts_of(output: str) -> list[tuple[int, str]]:
    """(token count, text) of each prompt `--show-prompt` printed."""
    return [(int(count), text) for count, text in PROMPT_BLOCK.findall(output)]


def replies_of(output: str) -> list[str]:
    return [
        line.removeprefix("model> ").strip() for line in output.splitlines() if "model> " in line
    ]


# --------------------------------------------------------------------------------------------
# The conversation's rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("  the film was great \n", ChatInput("message", "the film was great")),
        ("/reset", ChatInput("reset")),
        (" /RESET now", ChatInput("reset")),
        ("/exit", ChatInput("exit")),
        ("/quit\n", ChatInput("exit")),
        ("   \n", ChatInput("empty")),
        ("/rest", ChatInput("unknown", "/rest")),
        ("a /reset inside a message", ChatInput("message", "a /reset inside a message")),
    ],
)
def test_parse_input_tells_messages_from_commands(line, expected):
    assert parse_input(line) == expected


def test_conversation_puts_the_system_message_first_and_the_new_message_last():
    history = turn("hi", "hello")
    assert conversation(history, SYSTEM, "and now?") == [
        {"role": "system", "content": SYSTEM},
        *history,
        {"role": "user", "content": "and now?"},
    ]
    assert conversation(history, "  ", None) == history  # a blank system message is none
    assert conversation([], None, "first") == [{"role": "user", "content": "first"}]


def test_fit_history_drops_whole_oldest_turns_and_never_the_system_message():
    history = turn("one", "1") + turn("two", "22") + turn("three", "333")

    def characters(messages):  # a stand-in tokenizer: one token per character
        return sum(len(message["content"]) for message in messages)

    system_and_new = len(SYSTEM) + len("four")
    everything = system_and_new + characters(history)
    assert fit_history(history, SYSTEM, "four", characters, everything).history == history
    assert fit_history(history, SYSTEM, "four", characters, None).dropped_turns == 0

    fitted = fit_history(history, SYSTEM, "four", characters, everything - 1)
    assert fitted.history == turn("two", "22") + turn("three", "333")
    assert fitted.dropped_turns == 1
    fitted = fit_history(history, SYSTEM, "four", characters, system_and_new + len("three333"))
    assert fitted.history == turn("three", "333") and fitted.dropped_turns == 2
    fitted = fit_history(history, SYSTEM, "four", characters, system_and_new)
    assert fitted.history == [] and fitted.dropped_turns == 3

    too_long = rf"take {system_and_new} tokens, more than the {system_and_new - 1} .*--max-new"
    with pytest.raises(ValueError, match=too_long):
        fit_history(history, SYSTEM, "four", characters, system_and_new - 1)


def test_fit_history_counts_the_rendered_prompt_of_a_real_tokenizer(loaded):
    tokenizer = loaded.tokenizer
    history = []
    for index in range(12):
        history += turn(f"the film was great {index}", "the plot was dull and the actor bad")

    def prompt_length(messages):
        return len(render_prompt(tokenizer, messages))

    budget = context_budget(loaded.context_length, 8)
    assert (loaded.context_length, budget) == (64, 56)
    fitted = fit_history(history, SYSTEM, "good scene?", prompt_length, budget)
    kept_prompt = conversation(fitted.history, SYSTEM, "good scene?")
    assert prompt_length(kept_prompt) <= budget
    # One more turn would not have fitted: the fewest turns were dropped.
    one_more = conversation(history[-len(fitted.history) - 2 :], SYSTEM, "good scene?")
    assert prompt_length(one_more) > budget
    assert fitted.history == history[2 * fitted.dropped_turns :] and fitted.dropped_turns > 0


# --------------------------------------------------------------------------------------------
# One reply, streamed
# --------------------------------------------------------------------------------------------


def test_stream_reply_hands_over_text_while_it_is_generated_and_samples_as_generate(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    messages = conversation([], None, "the film was")
    settings = SamplingSettings(max_new_tokens=24, batch_size=1)
    forward_passes = []
    hook = model.register_forward_hook(lambda *_: forward_passes.append(1))
    pieces = []  # (forward passes so far, text)
    try:
        reply = stream_reply(
            model,
            tokenizer,
            render_prompt(tokenizer, messages),
            settings,
            seed=5,
            on_text=lambda text: pieces.append((len(forward_passes), text)),
        )
    finally:
        hook.remove()
    assert len(pieces) > 1
    assert pieces[0][0] < len(forward_passes)  # the first words came before the last step
    assert "".join(text for _, text in pieces).strip() == reply.text
    assert not reply.stopped and reply.tokens == len(forward_passes)
    rollout = generate(model, tokenizer, [messages], settings, seed=5)
    assert (reply.text, reply.ended, reply.tokens) == (
        rollout.texts[0],
        rollout.ended[0],
        len(rollout.response_ids[0]),
    )


def test_stream_reply_stops_at_every_end_id_of_the_generation_config(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    messages = conversation([], None, "the film was")
    settings = SamplingSettings(max_new_tokens=12, batch_size=1)
    first_token = generate(model, tokenizer, [messages], settings, seed=3).response_ids[0][0]
    assert first_token != tokenizer.eos_token_id
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, first_token]
    try:
        reply = stream_reply(
            model, tokenizer, render_prompt(tokenizer, messages), settings, 3, lambda _: None
        )
    finally:
        model.generation_config.eos_token_id = original
    assert (reply.ended, reply.tokens) == (True, 1)


def session_with_ctrl_c(chat_model, press_when, **options):
    """Two messages through `chat_session`; a real SIGINT goes to this process once
    `press_when(text, written so far)` is true for a text the session writes.
    Returns (everything written, the history)."""
    lines = iter(["the film was", "and the plot?"])
    written = []
    pressed = []

    def write(text):
        written.append(text)
        if not pressed and press_when(text, "".join(written)):
            pressed.append(text)
            os.kill(os.getpid(), signal.SIGINT)

    def read_line(prompt):
        written.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    try:
        history = chat_session(
            chat_model, CHAT_SAMPLING, seed=5, system=None, read_line=read_line, write=write,
            **options,
        )  # fmt: skip
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the session instead of stopping the reply")
    assert pressed, "the session never wrote what the test presses Ctrl-C at"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    return "".join(written), history


def unstopped_first_reply(chat_model):
    """The first reply of `session_with_ctrl_c` when nothing stops it."""
    tokenizer = chat_model.tokenizer
    prompt_ids = render_prompt(tokenizer, conversation([], None, "the film was"))
    seed = derived_seed(5, "chat", 0)
    return stream_reply(
        chat_model.model, tokenizer, prompt_ids, CHAT_SAMPLING, seed, lambda _: None
    )


def test_ctrl_c_during_a_reply_stops_it_and_the_session_goes_on(loaded):
    def after_the_first_word(text, written):
        return written.count("model> ") == 1 and not written.endswith("model> ")

    output, history = session_with_ctrl_c(loaded, after_the_first_word)
    assert output.count("(stopped)") == 1 and output.count("model> ") == 2
    shown = output.split("model> ")[1].split("\n")[0].strip()
    assert history[1] == {"role": "assistant", "content": shown}
    assert [message["content"] for message in history[::2]] == ["the film was", "and the plot?"]
    # Stopped early: what was shown is the start of the reply the same seed gives in full.
    full = unstopped_first_reply(loaded)
    assert not full.stopped and full.text.startswith(shown) and len(shown) < len(full.text)


def test_ctrl_c_before_the_reply_begins_stops_it_at_its_first_token(loaded):
    def while_the_first_prompt_is_shown(text, written):
        return text.startswith("--- prompt")

    output, history = session_with_ctrl_c(loaded, while_the_first_prompt_is_shown, show_prompt=True)
    assert output.count("(stopped)") == 1 and output.count("model> ") == 2
    shown = output.split("model> ")[1].split("\n")[0].strip()
    assert history[1] == {"role": "assistant", "content": shown} and len(history) == 4
    full = unstopped_first_reply(loaded)
    assert full.text.startswith(shown) and len(shown.split()) <= 1 < len(full.text.split())


# --------------------------------------------------------------------------------------------
# The command on a model folder
# --------------------------------------------------------------------------------------------


def test_chat_keeps_the_history_across_turns_and_reset_clears_it(model_folder):
    result = chat(
        "--model",
        str(model_folder),
        "--show-prompt",
        "--max-new-tokens",
        "6",
        "--system",
        SYSTEM,
        "--temperature",
        "0.7",
        input_text="the film was great\nwhy?\n/reset\nthe plot\n",
    )
    assert result.exit_code == 0, result.output
    assert f"Model: {model_folder}" in result.output
    assert "Sampling: temperature 0.7, top-k all, top-p 1, at most 6 new tokens, seed 0" in (
        result.output
    )
    prompts = [text for _, text in prompts_of(result.output)]
    replies = replies_of(result.output)
    assert len(prompts) == len(replies) == 3
    start = f"<|system|>{SYSTEM}<|end|>"
    assert prompts[0] == f"{start}<|user|>the film was great<|end|><|assistant|>"
    assert prompts[1] == (
        f"{start}<|user|>the film was great<|end|><|assistant|>{replies[0]}<|end|>"
        "<|user|>why?<|end|><|assistant|>"
    )
    assert "(history cleared)" in result.output
    assert prompts[2] == f"{start}<|user|>the plot<|end|><|assistant|>"


def test_chat_drops_the_oldest_turns_when_the_context_is_full(model_folder):
    messages = [f"the film {index} was great and the plot was good" for index in range(6)]
    result = chat(
        "--model",
        str(model_folder),
        "--show-prompt",
        "--max-new-tokens",
        "8",
        "--system",
        SYSTEM,
        input_text="\n".join([*messages, "/exit", "never read"]) + "\n",
    )
    assert result.exit_code == 0, result.output
    assert "were dropped from the history" in result.output
    prompts = prompts_of(result.output)
    assert len(prompts) == 6  # /exit ended the session before the last line
    assert all(count <= 64 - 8 for count, _ in prompts)
    last = prompts[-1][1]
    assert last.startswith(f"<|system|>{SYSTEM}<|end|>") and messages[-1] in last
    assert messages[0] not in last


def test_chat_explains_a_missing_folder_and_a_folder_that_is_no_model(tmp_path, model_folder):
    result = chat("--model", str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    assert "nowhere does not exist; pass --model champion, candidate" in result.output
    result = chat("--model", str(tmp_path))
    assert result.exit_code == 2
    assert "is not a model folder (no config.json in it)" in result.output
    (tmp_path / "config.json").write_text((model_folder / "config.json").read_text())
    result = chat("--model", str(tmp_path))
    assert result.exit_code == 2 and "has no *.safetensors weights to load" in result.output
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    result = chat("--model", str(tmp_path))
    assert result.exit_code == 2
    assert "only has pickled weights (pytorch_model.bin), which are refused" in result.output
    result = chat("--model", str(model_folder), "--top-p", "1.5")
    assert result.exit_code == 2 and "top_p must lie in (0, 1]" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# The command on the registry
# --------------------------------------------------------------------------------------------


@pytest.fixture
def registry_project(tmp_path, model_folder, empty_mlflow_db, monkeypatch):
    """A project whose dpo policy and reward model (the tiny model) were logged by their
    stage runs, with its own sqlite tracking store."""
    paths = ProjectPaths(tmp_path)
    database = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.setenv("RLHF_EXPERIMENT", "chat-test")
    monkeypatch.setattr(
        "mlflow.tracking._tracking_service.utils._tracking_uri", f"sqlite:///{database}"
    )
    for stage, folder in (("reward", paths.reward_model_dir), ("dpo", paths.policy_dir("dpo"))):
        shutil.copytree(model_folder, folder)
        run_model_stage(tmp_path, stage, {}, folder)
    return tmp_path


def test_chat_talks_to_the_champion_and_says_when_there_is_none(registry_project):
    result = chat("--model", "champion", input_text="hello\n")
    assert result.exit_code == 2
    assert f"No {POLICY_MODEL} version is the champion in the registry at" in result.output
    assert "run `rlhf run` (or `rlhf retrain`)" in result.output
    result = chat("--model", "candidate")
    assert result.exit_code == 2
    assert f"No {POLICY_MODEL} version is the candidate in the registry at" in result.output

    candidate = register_candidate(registry_project, "dpo", EVALUATION)
    result = chat("--model", "candidate", input_text="the film\n")
    assert result.exit_code == 0, result.output
    assert f"Model: {POLICY_MODEL} v{candidate.policy_version} (@candidate, dpo, run " in (
        result.output
    )
    assert chat("--model", "champion").exit_code == 2  # registered, not promoted

    promote(registry_client(registry_project), candidate)
    result = chat(
        "--model", "champion", "--max-new-tokens", "5", "--show-prompt",
        input_text="the film was great\nwhy?\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Model: {POLICY_MODEL} v{candidate.policy_version} (@champion, dpo, run " in (
        result.output
    )
    replies = replies_of(result.output)
    prompts = [text for _, text in prompts_of(result.output)]
    assert len(replies) == 2
    assert f"<|user|>the film was great<|end|><|assistant|>{replies[0]}<|end|>" in prompts[1]
