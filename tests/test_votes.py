"""The votes log of `rlhf label` and its batches (rlhf_core/data/votes.py), and the tally
math of people's votes (rlhf_core/evaluation/human_votes.py)."""

import json
import multiprocessing
import os
import random
import signal
import time
import traceback

import pytest

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data import votes as votes_module
from rlhf_core.data.store import ingest_files, read_table
from rlhf_core.data.votes import (
    BATCHES_STATE,
    LABEL_SOURCE,
    VoteJournal,
    preference_rows,
)
from rlhf_core.evaluation.human_votes import (
    annotator_agreement,
    head_to_head,
    verdict_counts,
)
from rlhf_core.evaluation.metrics import wilson_interval

PROMPT = [{"role": "user", "content": "Review the film in one line."}]


def vote(number, verdict="a", annotator="ann", better=None, answer_a=None, answer_b=None):
    """A vote record as the page makes it, with its preference rows."""
    record = {
        "vote_id": f"vote-{number}",
        "comparison_id": f"pair-{number}",
        "created_at": f"2026-12-02T01:{number // 60:02d}:{number % 60:02d}.000+00:00",
        "annotator": annotator,
        "verdict": verdict,
        "prompt": PROMPT,
        "answer_a": answer_a if answer_a is not None else f"A gripping film, take {number}.",
        "answer_b": answer_b if answer_b is not None else f"A dull film, take {number}.",
        "model_a": "candidate",
        "model_b": "champion",
        "better_answer": better,
        "sampling": {"temperature": 1.0, "seed_a": number, "seed_b": number + 1},
    }
    record["rows"] = preference_rows(record)
    return record


def batch_rows(incoming):
    """Every row of every batch in `incoming`, and the batch files."""
    files = sorted(incoming.glob("label-*.jsonl"))
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    return rows, files


@pytest.fixture
def folders(tmp_path):
    return tmp_path / "data" / "labels", tmp_path / "data" / "incoming"


# --------------------------------------------------------------------------------------------
# A vote's preference rows
# --------------------------------------------------------------------------------------------


def test_a_decisive_vote_is_one_row_and_a_tie_or_both_bad_is_none():
    [row] = vote(1, "a")["rows"]
    assert (row["chosen"], row["rejected"]) == ("A gripping film, take 1.", "A dull film, take 1.")
    assert (row["chosen_model"], row["rejected_model"]) == ("candidate", "champion")
    assert row["source"] == LABEL_SOURCE and row["annotator"] == "ann"
    [row] = vote(2, "b")["rows"]
    assert (row["chosen"], row["chosen_model"]) == ("A dull film, take 2.", "champion")
    assert vote(3, "tie")["rows"] == [] and vote(4, "both_bad")["rows"] == []


def test_a_written_answer_is_preferred_over_both_and_faulty_pairs_are_left_out():
    rows = vote(1, "both_bad", better="A tender, funny film.")["rows"]
    assert [(row["chosen"], row["rejected_model"]) for row in rows] == [
        ("A tender, funny film.", "candidate"),
        ("A tender, funny film.", "champion"),
    ]
    assert {row["chosen_model"] for row in rows} == {"annotator"}
    # identical answers: no pair to learn from; a written answer equal to B: only over A
    assert vote(2, "a", answer_a="Same.", answer_b="Same.")["rows"] == []
    rows = vote(3, "tie", better="A dull film, take 3.")["rows"]
    assert [row["rejected"] for row in rows] == ["A gripping film, take 3."]
    # an empty answer, and one over max_chars, would be quarantined: left out
    assert vote(4, "a", answer_b="")["rows"] == []
    record = vote(5, "b")
    long_rows = preference_rows({**record, "answer_a": "x" * 50}, ValidationSettings(max_chars=40))
    assert long_rows == []
    # anonymous: no annotator column rather than an empty one
    assert "annotator" not in vote(6, "a", annotator="")["rows"][0]


def test_rows_of_a_batch_pass_the_preference_store_ingest(folders, tmp_path):
    labels, incoming = folders
    journal = VoteJournal(labels, incoming, batch_size=100)
    script = "<script>window.__pwned = 1</script> & <b>bold</b>"
    records = [
        vote(1, "a"),
        vote(2, "b", annotator="ann2"),
        vote(3, "tie"),
        vote(4, "both_bad", better=script),
        vote(5, "a", annotator="", answer_a="Ünïcode: 映画 🎬 it works."),
    ]
    for record in records:
        journal.append(record)
    batch = journal.flush()
    rows, files = batch_rows(incoming)
    assert files == [batch] and len(rows) == 5  # 1 + 1 + 0 + 2 + 1
    [result] = ingest_files([batch], tmp_path / "store", "preference")
    assert (result.status, result.valid, result.quarantined, result.added) == ("ingested", 5, 0, 5)
    table = read_table(tmp_path / "store")
    assert set(table["source"]) == {LABEL_SOURCE}
    assert sorted(table["annotator"].dropna()) == ["ann", "ann", "ann", "ann2"]
    assert script in set(table["chosen"])  # stored as the raw string
    assert table["created_at"].str.endswith("+00:00").all()
    assert "chosen_model" not in table.columns  # extra columns stay in the archived batch
    archived = tmp_path / "store" / "archive" / result.sha256 / batch.name
    assert archived.read_bytes() == batch.read_bytes()


# --------------------------------------------------------------------------------------------
# The votes log
# --------------------------------------------------------------------------------------------


def test_votes_are_numbered_and_survive_a_reopen(folders):
    labels, incoming = folders
    first = VoteJournal(labels, incoming, batch_size=20)
    assert [first.append(vote(n)).seq for n in range(1, 4)] == [1, 2, 3]
    reopened = VoteJournal(labels, incoming, batch_size=20)
    assert [v["vote_id"] for v in reopened.votes()] == ["vote-1", "vote-2", "vote-3"]
    assert reopened.pending() == 3
    assert reopened.append(vote(4)).seq == 4
    assert first.append(vote(5)).seq == 5  # it sees the other instance's append
    assert [v["seq"] for v in first.votes()] == [1, 2, 3, 4, 5]


def test_every_batch_size_votes_become_one_batch_and_each_vote_lands_once(folders):
    labels, incoming = folders
    journal = VoteJournal(labels, incoming, batch_size=3)
    verdicts = ["a", "tie", "b", "a", "both_bad", "b", "a"]
    batches = [journal.append(vote(n, v)).batch for n, v in enumerate(verdicts, start=1)]
    assert [batch is not None for batch in batches] == [False, False, True] * 2 + [False]
    assert batches[2].name.endswith("-000001-000003.jsonl")
    assert journal.pending() == 1
    last = journal.flush()  # as at shutdown: the rest, whatever its size
    assert last.name.endswith("-000007-000007.jsonl") and journal.pending() == 0
    assert journal.flush() is None  # nothing left: no empty batch
    rows, files = batch_rows(incoming)
    assert len(files) == 3
    assert sorted(row["vote_id"] for row in rows) == [f"vote-{n}" for n in (1, 3, 4, 6, 7)]


def test_votes_without_rows_are_marked_done_without_a_batch(folders):
    labels, incoming = folders
    journal = VoteJournal(labels, incoming, batch_size=2)
    assert journal.append(vote(1, "tie")).batch is None
    assert journal.append(vote(2, "both_bad")).batch is None
    assert journal.pending() == 0 and not list(incoming.glob("*"))


def test_a_line_cut_short_by_a_crash_is_dropped_and_the_log_goes_on(folders):
    labels, incoming = folders
    journal = VoteJournal(labels, incoming)
    journal.append(vote(1))
    with open(labels / "votes.jsonl", "ab") as log:
        log.write(b'{"vote_id": "vote-2", "verdict": "a", "pro')  # killed mid-write
    reopened = VoteJournal(labels, incoming)
    assert [v["vote_id"] for v in reopened.votes()] == ["vote-1"]
    assert reopened.append(vote(3)).seq == 2
    lines = (labels / "votes.jsonl").read_text().splitlines()
    assert [json.loads(line)["vote_id"] for line in lines] == ["vote-1", "vote-3"]


def test_a_line_edited_into_nonsense_is_one_error_naming_the_line(folders):
    labels, incoming = folders
    VoteJournal(labels, incoming).append(vote(1))
    with open(labels / "votes.jsonl", "a") as log:
        log.write("not json\n")
    with pytest.raises(ValueError, match=r"votes.jsonl, line 2, is not a JSON vote"):
        VoteJournal(labels, incoming).votes()


class Crash(BaseException):
    """Stands for the process dying at that point: nothing after it runs."""


def crash_at(monkeypatch, point):
    """Make the batch commit die at `point`: "staged" (the rows synced, not yet named in
    batches.json), "committed" (named, not renamed into place), "renamed" (in place,
    batches.json not yet moved on)."""
    calls = {"state": 0}
    real_write_state = VoteJournal._write_state
    real_replace = os.replace

    def write_state(self, state):
        calls["state"] += 1
        if point == "staged" and state.get("staged"):
            raise Crash
        if point == "renamed" and not state.get("staged") and calls["state"] == 2:
            raise Crash
        real_write_state(self, state)

    def replace(source, target):
        if point == "committed" and str(target).endswith(".jsonl"):
            raise Crash
        real_replace(source, target)

    monkeypatch.setattr(VoteJournal, "_write_state", write_state)
    monkeypatch.setattr(votes_module.os, "replace", replace)


@pytest.mark.parametrize(
    ("point", "batches"),
    [("staged", 1), ("committed", 2), ("renamed", 2)],  # before the commit point: one batch
)
def test_a_crash_at_any_point_of_a_batch_commit_loses_and_repeats_no_row(
    folders, monkeypatch, point, batches
):
    labels, incoming = folders
    journal = VoteJournal(labels, incoming, batch_size=4)
    for number in range(1, 4):
        journal.append(vote(number))
    crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        journal.append(vote(4))  # its append completes the batch, whose commit dies
    monkeypatch.undo()
    assert [v["seq"] for v in journal.votes()] == [1, 2, 3, 4]  # the vote itself was saved
    journal.append(vote(5))  # more votes before the restart notices
    restarted = VoteJournal(labels, incoming, batch_size=4)
    restarted.recover()
    rows, files = batch_rows(incoming)
    assert sorted(row["vote_id"] for row in rows) == [f"vote-{n}" for n in range(1, 6)]
    assert len(files) == batches
    assert not list(incoming.glob(".*")) and not list(labels.glob(".*.tmp"))
    assert json.loads((labels / BATCHES_STATE).read_text()) == {"staged": None, "through": 5}
    assert restarted.recover() is None  # a second restart writes nothing again


def _append_votes(labels, incoming, worker, count):
    try:
        journal = VoteJournal(labels, incoming, batch_size=7)
        for number in range(count):
            journal.append(vote(1000 * worker + number, "ab"[number % 2], annotator=f"w{worker}"))
    except BaseException:  # the parent's assertion shows what went wrong in this process
        (labels.parent / f"worker-{worker}.error").write_text(traceback.format_exc())
        raise


def test_processes_appending_at_once_keep_every_vote_once(folders):
    labels, incoming = folders
    # Spawned, not forked: a test worker's threads (servers of earlier tests) must not be
    # half-copied into the voters.
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_append_votes, args=(labels, incoming, worker, 25))
        for worker in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    errors = [path.read_text() for path in sorted(labels.parent.glob("worker-*.error"))]
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0], errors
    journal = VoteJournal(labels, incoming)
    journal.flush()
    logged = journal.votes()
    assert [v["seq"] for v in logged] == list(range(1, 101))
    rows, files = batch_rows(incoming)
    assert sorted(row["vote_id"] for row in rows) == sorted(v["vote_id"] for v in logged)
    assert len(files) == 15  # 14 batches of 7 votes, then the last 2


def _vote_until_killed(labels, incoming, acknowledged):
    """Append votes as fast as possible, noting each one the journal said was saved."""
    journal = VoteJournal(labels, incoming, batch_size=3)
    with open(acknowledged, "a") as acks:
        for number in range(1, 100_000):
            journal.append(vote(number, "ab"[number % 2]))
            acks.write(f"vote-{number}\n")
            acks.flush()


@pytest.mark.parametrize("trial", range(6))
def test_a_process_killed_while_voting_loses_no_saved_vote_and_repeats_no_row(folders, trial):
    labels, incoming = folders
    acknowledged = labels.parent.parent / "acknowledged.txt"
    worker = multiprocessing.get_context("fork").Process(
        target=_vote_until_killed, args=(labels, incoming, acknowledged)
    )
    worker.start()
    deadline = time.monotonic() + 30
    while not acknowledged.is_file() or len(acknowledged.read_text().split()) < 5 + 4 * trial:
        assert worker.is_alive() and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0, 0.02))  # a kill at any point of an append
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    saved = acknowledged.read_text().split()
    restarted = VoteJournal(labels, incoming, batch_size=3)
    restarted.recover()
    logged = [v["vote_id"] for v in restarted.votes()]
    assert logged[: len(saved)] == saved  # every vote the page was told was saved
    assert len(logged) - len(saved) <= 1  # and at most the one in flight besides
    rows, _ = batch_rows(incoming)
    assert sorted(row["vote_id"] for row in rows) == sorted(
        v["vote_id"] for v in restarted.votes() for _ in v["rows"]
    )
    assert not list(incoming.glob(".*")) and restarted.pending() == 0


# --------------------------------------------------------------------------------------------
# The tally
# --------------------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    # 7 of 10: p = 0.7, z² = 3.8415; centre (0.7 + 0.19208) / 1.38415 = 0.64449,
    # half-width 1.96 · sqrt(0.021 + 0.0096039) / 1.38415 = 0.24772.
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.39677, abs=1e-4) and high == pytest.approx(0.89221, abs=1e-4)
    # 0 of 5: centre = half-width = (z²/10) / (1 + z²/5) = 0.21726
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(0.43449, abs=1e-4)
    with pytest.raises(ValueError, match="successes must be between 0 and trials=5"):
        wilson_interval(6, 5)


def test_head_to_head_counts_ties_as_half_and_leaves_both_bad_out():
    def between(verdict, candidate_side="a"):
        sides = ("candidate", "champion") if candidate_side == "a" else ("champion", "candidate")
        return {"verdict": verdict, "model_a": sides[0], "model_b": sides[1]}

    votes = [
        between("a"),  # candidate wins
        between("b", candidate_side="b"),  # candidate wins, on the right
        between("a", candidate_side="b"),  # champion wins
        between("a", candidate_side="b") | {"verdict": "b"},  # candidate wins
        between("tie"),
        between("tie", candidate_side="b"),
        between("both_bad"),
        {"verdict": "a", "model_a": "candidate", "model_b": "candidate"},  # not this pair
    ]
    result = head_to_head(votes)
    assert (result.wins, result.losses, result.ties, result.both_bad) == (3, 1, 2, 1)
    assert result.counted == 6
    assert result.win_rate == pytest.approx(4 / 6)  # (3 + 2·½) / 6
    assert (result.low, result.high) == pytest.approx(wilson_interval(4, 6))
    assert head_to_head([]).win_rate is None


def test_agreement_compares_named_annotators_on_shared_pairs():
    votes = [
        {"comparison_id": "c1", "annotator": "x", "verdict": "a"},
        {"comparison_id": "c1", "annotator": "y", "verdict": "a"},
        {"comparison_id": "c1", "annotator": "z", "verdict": "b"},
        {"comparison_id": "c2", "annotator": "x", "verdict": "tie"},
        {"comparison_id": "c2", "annotator": "y", "verdict": "tie"},
        {"comparison_id": "c2", "annotator": "", "verdict": "b"},  # anonymous: left out
        {"comparison_id": "c3", "annotator": "x", "verdict": "a"},  # one voter: not shared
    ]
    result = annotator_agreement(votes)
    # c1: (x,y) agree, (x,z) and (y,z) do not; c2: (x,y) agree
    assert (result.comparisons, result.annotator_pairs, result.agreeing) == (2, 4, 2)
    assert result.rate == pytest.approx(0.5)
    assert annotator_agreement(votes[-2:]).rate is None
    assert verdict_counts(votes) == {"a": 3, "b": 2, "tie": 2, "both_bad": 0}
