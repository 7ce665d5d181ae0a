"""People's votes on pairs of answers: the votes log (a durable journal) and the batches of
preference rows it hands to `data/incoming/`, each vote's rows exactly once.

Layout (a labels folder, `data/labels/` by default, beside the incoming folder):

    votes.jsonl      every vote, one JSON line each, in order; `seq` numbers them from 1
    batches.json     how far the log has gone out as batches (`through`), and the batch
                     being committed (`staged`) between its commit point and its end
    incoming/label-<time>-<first>-<last>.jsonl   a batch: the preference rows of votes
                     first..last, for the retrain deployment to ingest

A vote is appended (write, flush, fsync) under one lock across processes and threads
(`store_lock` on the labels folder) before anyone is told it is saved, so a crash loses at
most the vote being written; a line cut short by a crash is cut off at the next append.

A batch is committed as the preference store commits a file: its rows are written to a
hidden temporary in the incoming folder (which the retrain never reads) and synced; then
`batches.json` names it (the commit point); then it is renamed into place and `batches.json`
moves `through` past its votes. `recover` finishes a batch a crash left after its commit
point and deletes temporaries that never reached it, so each vote's rows land in exactly one
batch, whenever the process dies.

Which votes become preference rows (`preference_rows`): "A" or "B" gives (chosen: the
voted answer, rejected: the other); a tie or "both bad" gives none (the log keeps it, and
the tally counts it); a better answer written by the person gives (chosen: it, rejected:
each model answer), whatever the verdict. A pair the preference validation would
quarantine (identical or empty answers, a text over `max_chars`) is left out, so every
batch passes `rlhf ingest`. Who wrote each side and the sampling settings travel in extra
columns of the batch (`vote_id`, `chosen_model`, `rejected_model`, `sampling`): ingest keeps
only the canonical columns in the store's table, and the store archives the batch file byte
for byte, so they stay on record there and in the votes log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.expectations import inspect_row
from rlhf_core.data.schemas import REQUIRED_FIELDS
from rlhf_core.data.store_lock import store_lock
from rlhf_core.files import create_temporary_beside, sync_folder

LABEL_SOURCE = "rlhf-label"
VOTES_LOG = "votes.jsonl"
BATCHES_STATE = "batches.json"
BATCH_PREFIX = "label-"
WRITTEN_BY_ANNOTATOR = "annotator"  # the `chosen_model` of a row whose chosen answer a person wrote


# --------------------------------------------------------------------------------------------
# A vote's preference rows (pure)
# --------------------------------------------------------------------------------------------


def preference_rows(
    vote: Mapping[str, Any], settings: ValidationSettings | None = None
) -> list[dict[str, Any]]:
    """The canonical preference rows of one vote (see the module's docstring for the rules).

    `vote` holds `vote_id`, `prompt` (messages), `answer_a`, `answer_b`, `model_a`,
    `model_b`, `verdict`, `better_answer` (or None), `annotator` ("" for anonymous),
    `created_at` and `sampling`. Pairs the validation would quarantine under `settings`
    (`quarantine_reasons`) are left out.
    """
    answers = {"a": (vote["answer_a"], vote["model_a"]), "b": (vote["answer_b"], vote["model_b"])}
    pairs: list[tuple[tuple[str, str], tuple[str, str]]] = []
    if vote["verdict"] in answers:
        other = "b" if vote["verdict"] == "a" else "a"
        pairs.append((answers[vote["verdict"]], answers[other]))
    better = vote.get("better_answer")
    if better is not None and better.strip():
        pairs += [((better, WRITTEN_BY_ANNOTATOR), answers[side]) for side in ("a", "b")]
    settings = settings or ValidationSettings()
    rows = []
    for (chosen, chosen_model), (rejected, rejected_model) in pairs:
        row: dict[str, Any] = {
            "prompt": [dict(message) for message in vote["prompt"]],
            "chosen": chosen,
            "rejected": rejected,
            "source": LABEL_SOURCE,
            "created_at": vote["created_at"],
        }
        if vote.get("annotator"):
            row["annotator"] = vote["annotator"]
        if quarantine_reasons(row, "preference", settings):
            continue  # identical, empty or too long texts: validation would quarantine it
        row.update(
            vote_id=vote["vote_id"],
            chosen_model=chosen_model,
            rejected_model=rejected_model,
            sampling=vote.get("sampling"),
        )
        rows.append(row)
    return rows


# The row checks of the validation suite (`gx_suite.row_expectations`) that one row decides on
# its own: derived column -> (reason code, whether the value passes). Token lengths (only
# with a tokenizer), duplicates and split leaks depend on the tokenizer or the other rows.
_ROW_CHECKS = {
    "has_expected_types": ("wrong_type", lambda value: value is not False),
    "margin_is_valid": ("invalid_margin", lambda value: value is not False),
    "text_is_valid": ("invalid_text", lambda value: value is not False),
    "text_is_nonempty": ("empty_text", lambda value: value is not False),
    "roles_are_valid": ("invalid_role", lambda value: value is not False),
    "chosen_differs_from_rejected": ("chosen_equals_rejected", lambda value: value is not False),
}


def quarantine_reasons(
    row: Mapping[str, Any], kind: str, settings: ValidationSettings
) -> dict[str, str]:
    """The reasons (code -> sentence) the validation would quarantine `row` for, of those one
    row decides on its own; empty when it passes them. (`inspect_row` gives the derived
    values and a sentence for every check that could fail; the suite's bounds decide.)"""
    findings = inspect_row(row, kind, settings)
    failing = [
        code
        for column, (code, passes) in _ROW_CHECKS.items()
        if not passes(findings.values.get(column))
    ]
    if any(row.get(name) is None for name in REQUIRED_FIELDS[kind]):
        failing.append("missing_field")
    longest = findings.values.get("longest_text_chars")
    if longest is not None and longest > settings.max_chars:
        failing.append("too_long_chars")
    return {code: findings.notes.get(code, code) for code in failing}


def utc_now() -> str:
    """The current time as ISO-8601 UTC text with milliseconds (a row's `created_at`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# The votes log and its batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Appended:
    """A vote written to the log: its number, and the batch its append completed (or None)."""

    seq: int
    batch: Path | None


class VoteJournal:
    """The votes log in `folder` and its batches in `incoming`; `batch_size` votes a batch.

    Safe to share between threads and between processes on the same folders: every read
    that decides something and every write holds the labels folder's lock.
    """

    def __init__(self, folder: str | Path, incoming: str | Path, batch_size: int = 20) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.folder = Path(folder)
        self.incoming = Path(incoming)
        self.batch_size = batch_size
        self.log_path = self.folder / VOTES_LOG
        self.state_path = self.folder / BATCHES_STATE
        self._known: tuple[int, int] = (-1, 0)  # (log size in bytes, votes in it)

    def _lock(self):
        # Voters wait for one another routinely (a few ms each), so the wait says nothing.
        return store_lock(self.folder, on_wait=lambda _line: None)

    # ----- writing votes

    def append(self, vote: Mapping[str, Any]) -> Appended:
        """Write `vote` (plus its `seq`) to the log durably; then, when `batch_size` votes
        wait, write them as a batch. Returns once the vote is on disk."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock():
            seq = self._count_votes() + 1
            line = json.dumps({**vote, "seq": seq}, ensure_ascii=False, sort_keys=True) + "\n"
            with open(self.log_path, "ab") as log:
                log.write(line.encode("utf-8"))
                log.flush()
                os.fsync(log.fileno())
                self._known = (log.tell(), seq)
            return Appended(seq, self.flush(force=False))

    def _count_votes(self) -> int:
        """Votes in the log, after cutting off a last line that a crash left unfinished.
        (Cached by the log's size: another process's append changes it.)"""
        if not self.log_path.is_file():
            self._known = (0, 0)
            return 0
        size = self.log_path.stat().st_size
        if size == self._known[0]:
            return self._known[1]
        with open(self.log_path, "rb+") as log:
            data = log.read()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                log.truncate(complete)
                log.flush()
                os.fsync(log.fileno())
        count = data.count(b"\n", 0, complete)
        self._known = (complete, count)
        return count

    # ----- reading votes

    def votes(self) -> list[dict[str, Any]]:
        """Every vote in the log, in order (a last line still being written is not one)."""
        if not self.log_path.is_file():
            return []
        data = self.log_path.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].splitlines()
        votes = []
        for number, line in enumerate(lines, start=1):
            try:
                votes.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.log_path}, line {number}, is not a JSON vote ({error.msg}); the log "
                    "was edited by hand: restore that line or move it out of the file"
                ) from None
        return votes

    def pending(self) -> int:
        """Votes in the log not yet written as a batch."""
        with self._lock():
            return self._count_votes() - self._state()["through"]

    # ----- batches

    def flush(self, force: bool = True) -> Path | None:
        """Write the rows of the votes not in a batch yet as one new batch in the incoming
        folder: all of them when `force`, else only once `batch_size` votes wait. Returns
        the batch's path, or None when none was written (too few votes, or votes without
        rows, which are then marked done)."""
        with self._lock():
            state = self._finish_staged(self._state())
            count = self._count_votes()
            waiting = count - state["through"]
            if waiting == 0 or (not force and waiting < self.batch_size):
                return None
            new_votes = [vote for vote in self.votes() if vote["seq"] > state["through"]]
            rows = [row for vote in new_votes for row in vote.get("rows", [])]
            last = new_votes[-1]["seq"]
            if not rows:
                self._write_state({"through": last, "staged": None})
                return None
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            name = f"{BATCH_PREFIX}{stamp}-{new_votes[0]['seq']:06d}-{last:06d}.jsonl"
            self.incoming.mkdir(parents=True, exist_ok=True)
            temporary = _write_synced(self.incoming / name, _jsonl(rows))
            staged = {"name": name, "temporary": temporary.name, "through": last}
            self._write_state({"through": state["through"], "staged": staged})  # commit point
            self._finish_staged(self._state())
            return self.incoming / name

    def recover(self) -> Path | None:
        """At start: finish a batch a crash left after its commit point, delete batch
        temporaries that never reached it, and write the votes not in a batch yet as one
        (`flush`). Returns that batch's path, or None."""
        with self._lock():
            self._finish_staged(self._state())
            orphans = [*self.folder.glob(f".{BATCHES_STATE}.*.tmp")]
            if self.incoming.is_dir():
                orphans += self.incoming.glob(f".{BATCH_PREFIX}*.tmp")
            for orphan in orphans:
                orphan.unlink()
            return self.flush(force=True)

    def _state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"through": 0, "staged": None}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def _write_state(self, state: Mapping[str, Any]) -> None:
        temporary = _write_synced(self.state_path, json.dumps(state, sort_keys=True) + "\n")
        os.replace(temporary, self.state_path)
        sync_folder(self.folder)

    def _finish_staged(self, state: dict[str, Any]) -> dict[str, Any]:
        """Rename a committed batch into place (when not done yet) and mark its votes done."""
        staged = state.get("staged")
        if not staged:
            return state
        temporary = self.incoming / staged["temporary"]
        if temporary.is_file():
            os.replace(temporary, self.incoming / staged["name"])
            sync_folder(self.incoming)
        finished = {"through": staged["through"], "staged": None}
        self._write_state(finished)
        return finished


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def _write_synced(path: Path, text: str) -> Path:
    """Write `text` to a new hidden temporary beside `path` and fsync it; its path."""
    handle, temporary = create_temporary_beside(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary
