"""`rlhf label`: the page in headless Chromium against the real command, its JSON API under
20 concurrent voters, and bad input, on a tiny real model folder."""

import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from browser import chromium_page, screenshot
from fastapi.testclient import TestClient
from servers import free_port, log_tail, start_process, wait_for_http
from test_chat import registry_project  # noqa: F401 (a fixture)
from test_tracking_registry import EVALUATION, run_model_stage
from test_votes import vote as recorded_vote
from tiny_models import FILM_WORDS, chatty_policy
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.app.label_page import create_app, load_prompt_set
from rlhf_core.app.label_session import LabelSession, Writer
from rlhf_core.chat import ChatModel
from rlhf_core.config.data import ValidationSettings
from rlhf_core.config.training import SamplingSettings
from rlhf_core.data.store import read_table
from rlhf_core.data.validation import validate_files
from rlhf_core.data.votes import LABEL_SOURCE, VoteJournal
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.scripts import load_script
from rlhf_core.tracking.registry import POLICY_MODEL, promote, register_candidate, registry_client

pytestmark = pytest.mark.usefixtures("one_thread")
REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLING = SamplingSettings(max_new_tokens=8)
PROMPTS = [f"Tell me about the {word} of the film." for word in FILM_WORDS[:6]]
SCRIPT = '<script>window.__pwned = true</script><img src=x onerror="window.__pwned=true">'


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A 2-layer Llama with our chat template, trained 40 steps on film-word exchanges so that
    it answers in words and ends its answers, saved as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("label") / "policy"
    chatty_policy(folder, positions=256, exchanges=48, words=5, steps=40)
    return folder


@pytest.fixture(scope="module")
def chat_model(model_folder):
    model, tokenizer = load_causal_lm(str(model_folder))
    return ChatModel(model, tokenizer, "tiny-policy")


def champion_and_candidate(chat_model):
    # One model under both names: what is measured here is the bookkeeping, not the models.
    return [Writer("champion", chat_model), Writer("candidate", chat_model)]


@contextmanager
def served(session):
    """`create_app(session)` on uvicorn in a thread, on a free loopback port; stopped (and
    its shutdown flush run) at the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(session), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the label server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def batch_rows(incoming):
    files = sorted(incoming.glob("label-*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()], files


# --------------------------------------------------------------------------------------------
# The page, in a browser, against `rlhf label`
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_people_vote_in_the_page_and_the_rows_reach_the_preference_store(tmp_path, model_folder):
    for name in ("champion", "candidate"):  # two folders: the page's two-model mode
        shutil.copytree(model_folder, tmp_path / "models" / name)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    port = free_port()
    log = tmp_path / "label.log"
    server = start_process(
        [sys.executable, "-m", "rlhf_core.app.cli", "label",
         "--models", "models/champion,models/candidate", "--prompts", str(prompts_file),
         "--port", str(port), "--batch-size", "3", "--votes-per-pair", "1",
         "--max-new-tokens", "8", "--params", "none.yaml"],
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        log_path=log,
        cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, server, log, "rlhf label", timeout_s=90)
        with chromium_page(width=1400, height=900) as page:
            page.goto(url)
            page.fill("#annotator", "ann-1")
            answer_a = page.locator("#answer-a")
            page.wait_for_function("document.querySelector('#answer-a').textContent.length > 0")
            prompt_shown = page.locator("#prompt").text_content()
            assert prompt_shown in PROMPTS
            assert page.locator("#mode").text_content() == "models/champion vs models/candidate"

            def vote(button, better=None):
                if better is not None:
                    page.fill("#better", better)
                page.click(f"button[data-verdict='{button}']")
                page.wait_for_function("document.querySelector('#reveal').textContent !== ''")
                assert page.locator("#reveal").text_content() in (
                    "A was models/champion; B was models/candidate.",
                    "A was models/candidate; B was models/champion.",
                )
                message = page.locator("#message").text_content()
                assert message.startswith("Saved (vote "), message
                return message

            vote("a")
            page.click("#next")
            page.wait_for_function("document.querySelector('#reveal').textContent === ''")
            assert answer_a.text_content() != ""
            vote("b")
            page.click("#next")
            page.wait_for_function("document.querySelector('#reveal').textContent === ''")
            assert "Batch written: label-" in vote("tie")  # the third vote fills a batch
            page.wait_for_function("document.querySelector('#tally').textContent.includes('3 v')")
            tally = page.locator("#tally").text_content()
            assert "3 votes: A 1, B 1, tie 1, both bad 0; 0 not yet in a batch." in tally
            assert "models/candidate vs models/champion: wins " in tally
            screenshot(page, "label_page")
            # bad input: an empty typed prompt, then one holding markup
            page.fill("#typed", "   ")
            page.click("#ask")
            page.wait_for_function("document.querySelector('#message').className === 'error'")
            assert page.locator("#message").text_content() == (
                "The prompt is empty: type a question or an instruction."
            )
            page.fill("#typed", SCRIPT)
            page.click("#ask")
            page.wait_for_function("document.querySelector('#prompt').textContent.includes('<')")
            assert page.locator("#prompt").text_content() == SCRIPT  # shown as text
            assert page.evaluate("typeof window.__pwned") == "undefined"  # nothing ran
            # a megabyte written answer is refused with the reason; a short one is saved
            page.evaluate("document.querySelector('#better').value = 'x'.repeat(2 ** 20)")
            page.click("button[data-verdict='both_bad']")
            page.wait_for_function("document.querySelector('#message').className === 'error'")
            assert "The better answer has 1,048,576 characters; a preference row holds at " in (
                page.locator("#message").text_content()
            )
            vote("both_bad", better=SCRIPT)
            assert page.evaluate("typeof window.__pwned") == "undefined"
            page.wait_for_function("document.querySelector('#tally').textContent.includes('4 v')")
            # the annotator id is remembered by the browser
            page.reload()
            assert page.input_value("#annotator") == "ann-1"
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: the server writes its last batch and stops
        assert server.wait(30) == 0, log_tail(log)

    assert "4 votes in the log, 0 not yet in a batch." in log.read_text()
    incoming = tmp_path / "data" / "incoming"
    rows, files = batch_rows(incoming)
    assert len(files) == 2  # votes 1-3 (two rows), then vote 4 at shutdown (two rows)
    assert [row["annotator"] for row in rows] == ["ann-1"] * 4
    assert {row["source"] for row in rows} == {LABEL_SOURCE}
    assert [row["chosen"] for row in rows[2:]] == [SCRIPT, SCRIPT]  # stored raw
    assert rows[2]["prompt"] == [{"role": "user", "content": SCRIPT}]
    logged = VoteJournal(tmp_path / "data" / "labels", incoming).votes()
    assert [vote["verdict"] for vote in logged] == ["a", "b", "tie", "both_bad"]
    # the retrain deployment ingests data/incoming/ as `rlhf ingest` does
    store = tmp_path / "data" / "preferences"
    result = CliRunner().invoke(
        app, ["ingest", *map(str, files), "--store", str(store), "--no-dvc-add",
              "--params", str(tmp_path / "none.yaml")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count(": ingested: 2 rows, 2 valid, 0 quarantined, 2 added") == 2
    assert len(read_table(store)) == 4
    shown = REPOSITORY / "test-artifacts" / "label_page.png"
    assert shown.stat().st_size > 10_000


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


def test_twenty_concurrent_voters_lose_no_vote_and_leave_every_file_whole(tmp_path, chat_model):
    labels, incoming = tmp_path / "labels", tmp_path / "incoming"
    journal = VoteJournal(labels, incoming, batch_size=7)
    session = LabelSession(
        champion_and_candidate(chat_model),
        SAMPLING,
        [[{"role": "user", "content": prompt}] for prompt in PROMPTS],
        journal,
        ValidationSettings(),
        votes_per_pair=2,
    )
    failures, saved = [], []
    started = time.monotonic()
    with served(session) as url:

        def voter(number):
            rng = random.Random(number)
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(5):
                    pair = client.post("/api/comparison", json={"annotator": f"voter-{number}"})
                    verdict = rng.choice(["a", "b", "a", "b", "tie", "both_bad"])
                    answer = client.post(
                        "/api/vote",
                        json={"comparison_id": pair.json()["id"], "verdict": verdict,
                              "annotator": f"voter-{number}", "better_answer": ""},
                    )  # fmt: skip
                    (saved if answer.status_code == 200 else failures).append(answer.json())

        threads = [threading.Thread(target=voter, args=(number,)) for number in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        tally = httpx.get(f"{url}/api/tally").json()
    elapsed = time.monotonic() - started
    assert failures == [] and len(saved) == 100
    assert elapsed < 30, f"100 votes of 20 voters took {elapsed:.1f} s"
    logged = journal.votes()  # the log parses whole, line by line
    assert sorted(vote["seq"] for vote in logged) == list(range(1, 101))
    assert sorted(answer["seq"] for answer in saved) == list(range(1, 101))
    rows, files = batch_rows(incoming)  # the shutdown wrote the last votes' rows too
    assert sorted(row["vote_id"] for row in rows) == sorted(
        vote["vote_id"] for vote in logged for _ in vote["rows"]
    )
    # Batches of 7 votes by their number (14, then the last 2 at shutdown); a batch whose
    # votes were all ties or "both bad" has no rows and writes no file.
    by_seq = sorted(logged, key=lambda vote: vote["seq"])
    chunks = [by_seq[start : start + 7] for start in range(0, 100, 7)]
    assert len(files) == sum(any(vote["rows"] for vote in chunk) for chunk in chunks)
    assert not list(incoming.glob(".*"))
    decisive = sum(vote["verdict"] in ("a", "b") for vote in logged)
    assert len(rows) == decisive
    # the tally: every vote counted, the pairs two voters shared measured for agreement
    assert tally["votes"] == 100 and sum(tally["verdicts"].values()) == 100
    head = tally["head_to_head"]
    assert (head["challenger"], head["incumbent"]) == ("candidate", "champion")
    assert head["counted"] == 100 - tally["verdicts"]["both_bad"]
    assert 0 <= head["low"] <= head["win_rate"] <= head["high"] <= 1
    shared = {}
    for vote in logged:
        shared.setdefault(vote["comparison_id"], set()).add(vote["annotator"])
    assert tally["agreement"]["comparisons"] == sum(len(v) >= 2 for v in shared.values()) > 0
    assert max(len(voters) for voters in shared.values()) <= 2  # votes_per_pair


def test_bad_input_is_one_clear_sentence_and_text_is_stored_raw(tmp_path, chat_model):
    journal = VoteJournal(tmp_path / "labels", tmp_path / "incoming", batch_size=20)
    session = LabelSession(
        [Writer("tiny", chat_model)],
        SAMPLING,
        [],  # no prompt set: typed prompts only
        journal,
        ValidationSettings(max_chars=5000),
        annotator_required=True,
    )
    with served(session) as url, httpx.Client(base_url=url, timeout=60) as client:

        def refused(path, body, status, sentence):
            answer = client.post(path, json=body)
            assert (answer.status_code, answer.json()["error"]) == (status, sentence)

        assert client.get("/").text.count("innerHTML") == 0  # text goes in as textContent
        refused(
            "/api/comparison",
            {"annotator": "x"},
            400,
            "There is no prompt set: type a prompt in the box and press Ask both.",
        )
        refused(
            "/api/comparison",
            {"prompt": " \n"},
            400,
            "The prompt is empty: type a question or an instruction.",
        )
        refused(
            "/api/comparison",
            {"prompt": "x" * 5001},
            400,
            "The prompt has 5,001 characters; a preference row holds at most 5,000 "
            "(data.validation.max_chars in params.yaml): shorten it.",
        )
        refused(
            "/api/comparison",
            {"prompt": "the film\x00"},
            400,
            "The prompt cannot be used: prompt message 1 contains control character U+0000 "
            "at position 8.",
        )
        refused(
            "/api/comparison",
            {"prompt": "the film " * 200},
            400,
            # 2 tokens a "the film", 4 of the template; 256 positions less 8 new tokens
            "The prompt takes 404 tokens, more than the 248 the model reads before its "
            "answer: shorten it (or start rlhf label with a lower --max-new-tokens).",
        )
        pair = client.post("/api/comparison", json={"prompt": SCRIPT, "annotator": "x"}).json()
        assert pair["prompt"] == [{"role": "user", "content": SCRIPT}]
        vote = {"comparison_id": pair["id"], "verdict": "a", "annotator": "x"}
        refused(
            "/api/vote",
            {**vote, "verdict": "maybe"},
            400,
            "Pick one of: A is better, B is better, Tie, Both bad.",
        )
        refused(
            "/api/vote",
            {**vote, "annotator": " "},
            400,
            "Enter your annotator id at the top of the page before voting.",
        )
        refused(
            "/api/vote",
            {**vote, "better_answer": "y" * 2**20},
            400,
            "The better answer has 1,048,576 characters; a preference row holds at most "
            "5,000 (data.validation.max_chars in params.yaml): shorten it.",
        )
        refused(
            "/api/vote",
            {**vote, "better_answer": "a good\x07 film"},
            400,
            "The better answer cannot be saved: it contains control character U+0007 at "
            "position 6.",
        )
        refused(
            "/api/vote",
            {**vote, "comparison_id": "gone"},
            404,
            "This pair is no longer open (the server was restarted): load a new one.",
        )
        answer = client.post("/api/vote", json={**vote, "better_answer": SCRIPT})
        assert answer.status_code == 200 and answer.json()["model_a"] == "tiny (tiny-policy)"
        refused("/api/vote", vote, 409, "You already voted on this pair: load the next one.")
        answer = client.post("/api/vote", content=b"not json",
                             headers={"content-type": "application/json"})  # fmt: skip
        assert answer.status_code == 400
        assert answer.json()["error"] == "The request must be a JSON object; reload the page."
        answer = client.post("/api/vote", content=b"{" + b" " * (5 * 2**20) + b"}")
        assert (answer.status_code, answer.json()["error"]) == (
            413,
            "The request is over 4 MiB: shorten the texts.",
        )
        # a file where the votes log's folder should be: the vote fails, and can be retried
        second = client.post("/api/comparison", json={"prompt": "the film", "annotator": "x"})
        tie = {"comparison_id": second.json()["id"], "verdict": "tie", "annotator": "x"}
        labels = tmp_path / "labels"
        labels.rename(tmp_path / "labels.aside")
        labels.write_text("in the way")
        answer = client.post("/api/vote", json=tie)
        assert answer.status_code == 500
        assert answer.json()["error"].startswith("The server failed (FileExistsError: ")
        assert answer.json()["error"].endswith(
            "what you did last may not be saved: see the terminal running rlhf label."
        )
        labels.unlink()
        (tmp_path / "labels.aside").rename(labels)
        assert client.post("/api/vote", json=tie).json()["seq"] == 2
    [logged, retried] = journal.votes()
    assert (retried["verdict"], retried["rows"]) == ("tie", [])
    assert logged["better_answer"] == SCRIPT and logged["prompt"][0]["content"] == SCRIPT
    # A over B (unless the two samples are the same text), the written answer over both
    assert [row["chosen"] for row in logged["rows"]].count(SCRIPT) == 2
    assert len(logged["rows"]) == 2 + (logged["answer_a"] != logged["answer_b"])
    rows, files = batch_rows(tmp_path / "incoming")  # written when the server stopped
    assert rows == logged["rows"] and len(files) == 1


# --------------------------------------------------------------------------------------------
# The command's refusals
# --------------------------------------------------------------------------------------------


def label(tmp_path, *args):
    """`rlhf label ARGS` run from `tmp_path` with no params file (params' defaults)."""
    return CliRunner().invoke(app, ["label", "--params", str(tmp_path / "none.yaml"), *args])


def test_the_command_explains_bad_choices_a_taken_port_and_a_missing_champion(
    tmp_path, monkeypatch, empty_mlflow_db
):
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    result = label(tmp_path, "--models", "a,b,c")
    assert result.exit_code == 2
    assert "--models takes two different models separated by a comma, got 'a,b,c'." in (
        result.output
    )
    result = label(tmp_path, "--models", "a,b", "--model", "a")
    assert result.exit_code == 2 and "not both" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = label(tmp_path, "--port", str(port))
    assert result.exit_code == 2
    assert f"Cannot serve on 127.0.0.1:{port} (Address already in use); pass another --port" in (
        result.output
    )
    result = label(tmp_path, "--prompts", "missing.jsonl", "--port", str(free_port()))
    assert result.exit_code == 2 and "data file 'missing.jsonl' does not exist" in result.output
    # a server that died with two votes not yet in a batch: the next start writes them
    crashed = VoteJournal(tmp_path / "data" / "labels", tmp_path / "data" / "incoming", 20)
    for number in (1, 2):
        crashed.append(recorded_vote(number, "a"))
    result = label(tmp_path, "--port", str(free_port()))  # champion,candidate by default
    assert result.exit_code == 2, result.output
    [batch] = batch_rows(tmp_path / "data" / "incoming")[1]
    assert f"Wrote the votes an earlier run left unbatched to {batch}" in result.output
    assert [row["vote_id"] for row in batch_rows(batch.parent)[0]] == ["vote-1", "vote-2"]
    assert "No validated eval prompts yet" in result.output
    assert "No rlhf-policy version is the champion in the registry at" in result.output
    assert "Traceback" not in result.output


def test_the_page_compares_the_registry_champion_with_the_candidate(
    registry_project,  # noqa: F811 (the fixture imported from test_chat)
    monkeypatch,
):
    tmp_path = registry_project  # its dpo policy and reward model logged by their stage runs
    paths = ProjectPaths(tmp_path)
    champion = register_candidate(tmp_path, "dpo", EVALUATION)
    promote(registry_client(tmp_path), champion)
    run_model_stage(tmp_path, "dpo", {}, paths.policy_dir("dpo"))  # the next policy
    candidate = register_candidate(tmp_path, "dpo", EVALUATION)
    served_apps = []  # the app `rlhf label` serves, driven here in-process instead of uvicorn
    monkeypatch.setattr(
        "uvicorn.run", lambda served_app, **_options: served_apps.append(served_app)
    )

    result = label(tmp_path, "--max-new-tokens", "8", "--port", str(free_port()))
    assert result.exit_code == 0, result.output
    assert f"Model champion: {POLICY_MODEL} v{champion.policy_version} (@champion" in result.output
    assert f"Model candidate: {POLICY_MODEL} v{candidate.policy_version} (@candidate" in (
        result.output
    )
    with TestClient(served_apps[0]) as client:
        assert client.get("/api/config").json()["mode"] == "champion vs candidate"
        pair = client.post("/api/comparison", json={"prompt": "the film was", "annotator": "a"})
        saved = client.post(
            "/api/vote", json={"comparison_id": pair.json()["id"], "verdict": "a", "annotator": "a"}
        ).json()
        revealed = sorted([saved["model_a"], saved["model_b"]])
        assert revealed[0].startswith(f"candidate ({POLICY_MODEL} v{candidate.policy_version} ")
        assert revealed[1].startswith(f"champion ({POLICY_MODEL} v{champion.policy_version} ")
        head = client.get("/api/tally").json()["head_to_head"]
        won = saved["model_a"].startswith("candidate")
        assert (head["wins"], head["losses"], head["counted"]) == (int(won), int(not won), 1)
    [logged] = VoteJournal(tmp_path / "data" / "labels", paths.incoming_dir).votes()
    assert {logged["model_a"], logged["model_b"]} == {"champion", "candidate"}
    assert len(batch_rows(paths.incoming_dir)[0]) == len(logged["rows"])  # flushed at the end
    # Each side's training run is recorded, so the gate counts this vote for exactly the
    # candidate policy in artifacts/ against the champion.
    client = registry_client(tmp_path)
    versions = {"champion": champion, "candidate": candidate}
    runs = {
        role: client.get_model_version(POLICY_MODEL, version.policy_version).run_id
        for role, version in versions.items()
    }
    assert runs["champion"] != runs["candidate"]
    assert {logged[f"model_{side}"]: logged[f"model_{side}_run_id"] for side in "ab"} == runs
    quality_gate = load_script(REPOSITORY / "tasks" / "quality_gate.py")
    champion_version = client.get_model_version(POLICY_MODEL, champion.policy_version)
    human = quality_gate.human_votes(tmp_path, "dpo", champion_version)
    assert (human["counted"], human["wins"]) == (1, int(won))


def test_prompts_come_from_the_validated_eval_prompts_or_a_file(tmp_path):
    settings = ValidationSettings()
    assert load_prompt_set("eval", tmp_path, settings) == []  # not validated yet: typed only
    raw = tmp_path / "eval_prompts.jsonl"
    raw.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in PROMPTS[:3]))
    validate_files([raw], "prompts", ProjectPaths(tmp_path).validated_set("eval_prompts"),
                   data_docs=False)  # fmt: skip
    expected = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:3]]
    assert load_prompt_set("eval", tmp_path, settings) == expected
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"prompt": PROMPTS[0]}, {"prompt": "  "}, {"prompt": [{"role": "assistant",
            "content": "no question"}]}, {"prompt": PROMPTS[1]}]  # fmt: skip
    mixed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_prompt_set(str(mixed), tmp_path, settings) == [expected[0], expected[1]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(ValueError, match=r"empty.jsonl holds no usable prompt \(each row needs"):
        load_prompt_set(str(empty), tmp_path, settings)
