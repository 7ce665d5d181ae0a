"""The append-only preference store: validated rows merged by content hash, originals archived.

Layout of a store directory (`rlhf ingest` and the retrain flow version it with `dvc add`,
in `rlhf_core.orchestration.store_versioning.track_store`; this module knows nothing of DVC):

    pairs.parquet         merged valid preference pairs (`rankings.parquet` for ranked data)
    manifest.jsonl        one line per ingested file, in order: hash, name, time, counts, status
    archive/<sha256>/     each ingested file, byte for byte, never deleted
    reports/<sha256>/     its validation report and quarantined rows (with reasons)
    commit.json           only between an ingest's commit point and its end (see below)

One writer at a time: every write holds the store's cross-process lock (`store_lock`). Each
file's ingest ends in a commit that a crash cannot split: the new table is written under a
temporary name and synced, then `commit.json` (the new table's name and the manifest entry)
is written atomically, which is the commit point; then the table is renamed into place, the
manifest rewritten atomically and the journal removed. The next writer finishes a journal it
finds (`recover_store`) and deletes temporaries no journal names, so a kill at any point
leaves the store as it was before that file's ingest or as it is after it, never between.

Every row carries provenance: `content_hash`, `source_file` (name as given), `source_line`,
`file_sha256` and `ingested_at`. Because ingestion is a pure function of the archived files,
their order and the settings recorded in the manifest, `rebuild_store` reproduces any past
version of the table exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.readers import check_file_size
from rlhf_core.data.schemas import OPTIONAL_FIELDS, REQUIRED_FIELDS, content_hash
from rlhf_core.data.store_lock import store_lock
from rlhf_core.data.validation import validate_files
from rlhf_core.files import create_temporary_beside, file_sha256, sync_folder

TABLES = {"preference": "pairs.parquet", "ranked": "rankings.parquet"}
MANIFEST = "manifest.jsonl"
COMMIT_JOURNAL = "commit.json"
PROVENANCE_COLUMNS = ["content_hash", "source_file", "source_line", "file_sha256", "ingested_at"]


@dataclass(frozen=True)
class IngestResult:
    """What happened to one input file."""

    file: str
    sha256: str
    status: str  # "ingested" | "already_ingested" | "rejected"
    total: int = 0
    valid: int = 0
    quarantined: int = 0
    added: int = 0
    duplicates: int = 0
    valid_fraction: float | None = None
    report_dir: str | None = None


def _plain(value: Any) -> Any:
    """Parquet hands back numpy arrays for list columns; turn them into plain Python values."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _schema_columns(kind: str) -> list[str]:
    return list(REQUIRED_FIELDS[kind]) + [f for f in OPTIONAL_FIELDS[kind] if f != "split"]


def read_manifest(store_dir: str | Path) -> list[dict[str, Any]]:
    """The store's ingestion log, oldest first (empty for a new store)."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_table(store_dir: str | Path, kind: str = "preference") -> pd.DataFrame:
    """The merged table of `kind`, with plain Python values (empty frame for a new store)."""
    path = Path(store_dir) / TABLES[_check_kind(kind)]
    if not path.is_file():
        return pd.DataFrame(columns=_schema_columns(kind) + PROVENANCE_COLUMNS)
    table = pd.read_parquet(path)
    return table.map(_plain) if len(table) else table


def _check_kind(kind: str) -> str:
    if kind not in TABLES:
        raise ValueError(f"the store holds {sorted(TABLES)} data, not {kind!r}")
    return kind


def _write_durably(path: Path, write: Any) -> None:
    """Write `path` atomically and durably: `write(temporary path)`, fsync, rename, fsync the
    folder. A crash leaves the old file or the new one, never a part of either."""
    temporary = _stage(path, write)
    os.replace(temporary, path)
    sync_folder(path.parent)


def _stage(path: Path, write: Any) -> Path:
    """`write(temporary path)` beside `path` and fsync it; returns the temporary's path."""
    handle, temporary = create_temporary_beside(path)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _write_text(text: str) -> Any:
    return lambda temporary: Path(temporary).write_text(text, encoding="utf-8")


def _manifest_text(entries: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)


def _new_rows(
    valid: pd.DataFrame, kind: str, source_name: str, sha: str, when: str
) -> pd.DataFrame:
    columns = _schema_columns(kind)
    rows = []
    for record in valid.to_dict(orient="records"):
        row = {column: _plain(record.get(column)) for column in columns}
        row["content_hash"] = content_hash(row, kind)
        row["source_file"] = source_name
        row["source_line"] = int(record["source_line"])
        row["file_sha256"] = sha
        row["ingested_at"] = when
        rows.append(row)
    return pd.DataFrame(rows, columns=columns + PROVENANCE_COLUMNS)


def _merge(table: pd.DataFrame, new_rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Append rows whose content hash is not in the table yet (nor earlier in `new_rows`)."""
    seen = set(table["content_hash"]) if len(table) else set()
    fresh = new_rows[~new_rows["content_hash"].isin(seen)]
    fresh = fresh.drop_duplicates(subset="content_hash", keep="first")
    duplicates = len(new_rows) - len(fresh)
    if not len(table):
        return fresh.reset_index(drop=True), duplicates
    return pd.concat([table, fresh], ignore_index=True), duplicates


def _ingest_one(
    archived: Path,
    source_name: str,
    sha: str,
    when: str,
    store: Path,
    kind: str,
    settings: ValidationSettings,
    tokenizer: Any,
) -> tuple[IngestResult, pd.DataFrame | None]:
    report_dir = store / "reports" / sha
    report = validate_files([archived], kind, report_dir, settings, tokenizer, data_docs=False)
    base = {
        "file": source_name,
        "sha256": sha,
        "total": report["total"],
        "valid": report["valid"],
        "quarantined": report["quarantined"],
        "valid_fraction": report["valid_fraction"],
        "report_dir": str(report_dir),
    }
    if not report["passed"]:
        return IngestResult(status="rejected", **base), None
    valid = pd.read_parquet(report_dir / "valid.parquet")
    new_rows = _new_rows(valid, kind, source_name, sha, when)
    merged, duplicates = _merge(read_table(store, kind), new_rows)
    result = IngestResult(
        status="ingested", added=len(new_rows) - duplicates, duplicates=duplicates, **base
    )
    return result, merged


def ingest_files(
    paths: Sequence[str | Path],
    store_dir: str | Path,
    kind: str = "preference",
    settings: ValidationSettings | None = None,
    tokenizer: Any = None,
    now: datetime | None = None,
) -> list[IngestResult]:
    """Validate each file and merge its valid rows into the store, deduplicated by content hash.

    A file already in the manifest (same sha256) adds nothing. A file whose valid fraction is
    below `settings.min_valid_fraction` is archived and recorded as rejected, but merges nothing.
    """
    kind = _check_kind(kind)
    settings = settings or ValidationSettings()
    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    with store_lock(store):
        recover_store(store)
        return [_ingest_path(Path(path), store, kind, settings, tokenizer, now) for path in paths]


def _ingest_path(
    path: Path,
    store: Path,
    kind: str,
    settings: ValidationSettings,
    tokenizer: Any,
    now: datetime | None,
) -> IngestResult:
    """Ingest one file into the store (whose lock the caller holds) and commit it."""
    if path.is_symlink():
        raise ValueError(
            f"{path}: a symbolic link (to {os.readlink(path)}); ingest reads regular files "
            "only, so no link can pull a file from elsewhere into the store: copy the file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to ingest")
    sha = file_sha256(path)
    if any(e["sha256"] == sha and e["status"] == "ingested" for e in read_manifest(store)):
        return IngestResult(file=path.name, sha256=sha, status="already_ingested")
    check_file_size(path, settings.max_file_bytes)  # before a copy lands in the archive
    archived = store / "archive" / sha / path.name
    archived_before = archived.is_file() and file_sha256(archived) == sha
    if not archived_before:  # absent, or a partial copy
        _archive(path, archived, sha)
    when = (now or datetime.now(UTC)).isoformat()
    try:
        result, merged = _ingest_one(
            archived, path.name, sha, when, store, kind, settings, tokenizer
        )
    except ValueError as error:  # refused whole: no manifest entry, so no archived copy
        if not archived_before:
            shutil.rmtree(archived.parent, ignore_errors=True)
            shutil.rmtree(store / "reports" / sha, ignore_errors=True)
        raise ValueError(str(error).replace(str(archived), str(path))) from None
    entry = {
        **dataclasses.asdict(result),
        "kind": kind,
        "ingested_at": when,
        "archive": str(archived.relative_to(store)),
        "settings": dataclasses.asdict(settings),
    }
    entry.pop("report_dir")
    _commit(store, kind, merged, entry)
    return result


def _commit(store: Path, kind: str, merged: pd.DataFrame | None, entry: dict[str, Any]) -> None:
    """Commit one file's ingest: stage the table, write the journal (the commit point), apply."""
    table = store / TABLES[kind]
    staged = None
    if merged is not None:
        staged = _stage(table, lambda temporary: merged.to_parquet(temporary, index=False))
    journal = {"table": table.name, "staged": staged.name if staged else None, "entry": entry}
    try:
        _write_durably(store / COMMIT_JOURNAL, _write_text(json.dumps(journal, sort_keys=True)))
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    recover_store(store)


def recover_store(store_dir: str | Path) -> str | None:
    """Finish an ingest a crash left after its commit point, and delete the temporaries of
    ingests that never reached it. Call it holding the store's lock (`ingest_files` does).

    Idempotent: a kill inside this function leaves work that the next call finishes. Returns
    the file whose ingest was finished, or None.
    """
    store = Path(store_dir)
    journal_path = store / COMMIT_JOURNAL
    finished = None
    if journal_path.is_file():
        journal = json.loads(journal_path.read_text(encoding="utf-8"))
        if journal["staged"] and (store / journal["staged"]).is_file():
            os.replace(store / journal["staged"], store / journal["table"])
        manifest = read_manifest(store)
        if journal["entry"] not in manifest:
            entries = _manifest_text([*manifest, journal["entry"]])
            _write_durably(store / MANIFEST, _write_text(entries))
        journal_path.unlink()
        sync_folder(store)
        finished = journal["entry"]["file"]
    for temporary in [*store.glob(".*.tmp"), *store.glob("archive/*/.*.tmp")]:
        temporary.unlink()
    return finished


def _archive(source: Path, archived: Path, sha: str) -> None:
    """Copy `source` to `archived` under a temporary name, check its sha256, then rename it
    into place: a copy cut short (a full disk, a kill) never stands as the archive, and a
    file that changed while it was read is an error, not a mislabelled archive."""
    archived.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = create_temporary_beside(archived)
    try:
        with open(source, "rb") as reader, os.fdopen(handle, "wb") as writer:
            shutil.copyfileobj(reader, writer)
            writer.flush()
            os.fsync(writer.fileno())
        if file_sha256(temporary) != sha:
            raise ValueError(f"{source} changed while it was being ingested; ingest it again")
        os.replace(temporary, archived)
    except OSError as error:
        raise OSError(f"cannot archive {source} to {archived}: {error}") from error
    finally:
        if temporary.exists():
            temporary.unlink()


def rebuild_store(store_dir: str | Path, out_dir: str | Path, upto: int | None = None) -> Path:
    """Rebuild the store as it was after its first `upto` manifest entries (all when None).

    Replays the archived files in manifest order with the recorded times and settings into
    `out_dir`, and returns it. The rebuilt tables equal the originals row for row.
    """
    store = Path(store_dir)
    entries = read_manifest(store)
    entries = entries if upto is None else entries[:upto]
    out = Path(out_dir)
    for entry in entries:
        if entry["status"] != "ingested":
            continue
        archived = store / entry["archive"]
        renamed = out / ".replay" / entry["sha256"] / entry["file"]
        renamed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(archived, renamed)
        ingest_files(
            [renamed],
            out,
            kind=entry["kind"],
            settings=ValidationSettings(**entry["settings"]),
            now=datetime.fromisoformat(entry["ingested_at"]),
        )
    shutil.rmtree(out / ".replay", ignore_errors=True)
    return out
