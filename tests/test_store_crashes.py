"""The store under kills and concurrent writers: every ingest is all or nothing, and parallel
ingests of N files always end with the union of their rows.

Writers run in real processes (a forkserver that has imported the store once, so a trial
costs a fork, not an interpreter start) and are killed with SIGKILL, as the OOM killer or a
lost machine would.
"""

import json
import multiprocessing
import random
import shutil
import signal
import time
from datetime import UTC, datetime

import pandas as pd
import pytest
from forkservers import stop_forkserver

from rlhf_core.data.store import (
    COMMIT_JOURNAL,
    ingest_files,
    read_manifest,
    read_table,
    rebuild_store,
    recover_store,
)
from rlhf_core.data.store_lock import store_lock

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ROWS_PER_FILE = 300
KILLS_NEEDED = 20


@pytest.fixture(scope="module")
def processes():
    stop_forkserver()  # one another test file started here would keep its own preloads
    context = multiprocessing.get_context("forkserver")
    # Everything an ingest imports (Great Expectations takes seconds), imported once.
    context.set_forkserver_preload([__name__, "rlhf_core.data.readers", "great_expectations"])
    return context


def _batch(path, tag, rows=ROWS_PER_FILE):
    records = (
        {
            "prompt": f"Review film {tag}-{i}.",
            "chosen": f"Film {tag}-{i} was a delight from start to end.",
            "rejected": f"Film {tag}-{i} was dull.",
        }
        for i in range(rows)
    )
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _ingest(paths, store, now):
    ingest_files(paths, store, now=now)


def _state(store):
    """What a reader sees: the manifest and the table (rows in order, all columns)."""
    return read_manifest(store), read_table(store)


def _same(state, other):
    (manifest, table), (other_manifest, other_table) = state, other
    if manifest != other_manifest or len(table) != len(other_table):
        return False
    if not len(table):
        return True
    return table.reset_index(drop=True).equals(other_table.reset_index(drop=True))


def _leftovers(store):
    names = [*store.glob(".*.tmp"), *store.glob("archive/*/.*.tmp"), store / COMMIT_JOURNAL]
    return [path for path in names if path.exists()]


@pytest.mark.slow
def test_a_killed_ingest_leaves_the_store_before_or_after_each_file(tmp_path, processes):
    base = tmp_path / "base"
    ingest_files([_batch(tmp_path / "first.jsonl", "a", rows=400)], base, now=T0)
    new_files = [_batch(tmp_path / "second.jsonl", "b"), _batch(tmp_path / "third.jsonl", "c")]
    # The states a reader may see: before, after the second file, after both.
    expected = [_state(base)]
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    for count in (1, 2):
        ingest_files(new_files[count - 1 : count], reference, now=T0)
        expected.append(_state(reference))
    assert len(expected[2][1]) == 400 + 2 * ROWS_PER_FILE

    warm_up = processes.Process(target=_ingest, args=([], tmp_path / "warm", T0))
    warm_up.start()  # starts the forkserver (seconds of imports), not part of an ingest
    warm_up.join()
    timed = tmp_path / "timed"
    shutil.copytree(base, timed)
    started = time.monotonic()
    child = processes.Process(target=_ingest, args=(new_files, timed, T0))
    child.start()
    child.join()
    duration = time.monotonic() - started
    assert child.exitcode == 0 and _same(_state(timed), expected[2])

    rng = random.Random(16)
    outcomes = {0: 0, 1: 0, 2: 0}
    landed = attempts = 0
    while landed < KILLS_NEEDED and attempts < 3 * KILLS_NEEDED:
        attempts += 1
        store = tmp_path / f"trial{attempts}"
        shutil.copytree(base, store)
        child = processes.Process(target=_ingest, args=(new_files, store, T0))
        child.start()
        time.sleep(rng.uniform(0.0, duration))
        child.kill()  # SIGKILL, unless it has finished already
        child.join()
        if child.exitcode != -signal.SIGKILL:
            continue  # it had finished: not a kill
        landed += 1
        with store_lock(store):
            recover_store(store)
        assert _leftovers(store) == []
        state = _state(store)
        matches = [i for i, candidate in enumerate(expected) if _same(state, candidate)]
        assert matches, f"trial {attempts}: the store is between two ingests"
        outcomes[matches[0]] += 1
        # Ingesting the same files again completes the store, exactly as if never killed.
        ingest_files(new_files, store, now=T0)
        assert _same(_state(store), expected[2]), f"trial {attempts}: the retry differs"
        shutil.rmtree(store)
    print(f"kills landed {landed}/{attempts}; files committed at the kill: {outcomes}")
    assert landed >= KILLS_NEEDED
    # The kills fell before, between and after the two files' commits, not all in one place.
    assert sum(1 for count in outcomes.values() if count) >= 2


@pytest.mark.slow
def test_parallel_ingests_of_n_files_end_with_the_union(tmp_path, processes):
    files = [_batch(tmp_path / f"batch{k}.jsonl", f"p{k}") for k in range(3)]
    for round_number in range(3):
        store = tmp_path / f"store{round_number}"
        children = [processes.Process(target=_ingest, args=([f], store, None)) for f in files]
        for child in children:
            child.start()
        for child in children:
            child.join()
        assert [child.exitcode for child in children] == [0, 0, 0]
        manifest = read_manifest(store)
        assert sorted(entry["file"] for entry in manifest) == [f.name for f in files]
        assert [entry["added"] for entry in manifest] == [ROWS_PER_FILE] * 3
        table = read_table(store)
        assert len(table) == 3 * ROWS_PER_FILE
        assert set(table["source_file"]) == {f.name for f in files}
    # The store is the pure function of its archive and manifest it claims to be.
    rebuilt = rebuild_store(store, tmp_path / "rebuilt")
    pd.testing.assert_frame_equal(read_table(rebuilt), read_table(store))


def test_an_ingest_waits_for_the_writer_holding_the_store(tmp_path, processes):
    store = tmp_path / "store"
    source = _batch(tmp_path / "late.jsonl", "w")
    with store_lock(store):
        child = processes.Process(target=_ingest, args=([source], store, T0))
        child.start()
        child.join(timeout=3.0)
        assert child.is_alive(), "the ingest wrote while another writer held the store"
        assert read_manifest(store) == []
    child.join(timeout=60)
    assert child.exitcode == 0
    assert len(read_table(store)) == ROWS_PER_FILE


def test_recovery_finishes_a_commit_cut_short_after_its_journal(tmp_path):
    """The commit point is the journal: with it written and nothing else, the next writer
    applies it (rename the staged table, append the manifest entry) and removes it."""
    store = tmp_path / "store"
    ingest_files([_batch(tmp_path / "one.jsonl", "j")], store, now=T0)
    done = tmp_path / "done"
    shutil.copytree(store, done)
    ingest_files([_batch(tmp_path / "two.jsonl", "k")], done, now=T0)
    # Rebuild the moment after the commit point by hand, from the finished store.
    [_first, second] = read_manifest(done)
    staged = store / ".pairs.parquet.cafe.tmp"
    shutil.copy2(done / "pairs.parquet", staged)
    journal = {"table": "pairs.parquet", "staged": staged.name, "entry": second}
    (store / COMMIT_JOURNAL).write_text(json.dumps(journal), encoding="utf-8")
    stray = store / ".manifest.jsonl.beef.tmp"  # a temporary no journal names
    stray.write_text("partial", encoding="utf-8")

    assert recover_store(store) == "two.jsonl"
    assert _same(_state(store), _state(done))
    assert _leftovers(store) == [] and not stray.exists()
    assert recover_store(store) is None  # idempotent
