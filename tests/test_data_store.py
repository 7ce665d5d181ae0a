"""The append-only preference store: merge by content hash, provenance, archive, rebuild."""

import json
from datetime import UTC, datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.store import (
    ingest_files,
    read_manifest,
    read_table,
    rebuild_store,
)
from rlhf_core.files import file_sha256

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _pair(i, chosen=None):
    return {
        "prompt": f"Review film number {i}.",
        "chosen": chosen or f"Film {i} was wonderful.",
        "rejected": f"Film {i} was dull.",
    }


def _write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _lenient():
    return ValidationSettings(min_valid_fraction=0.5)


def test_ingest_merges_valid_rows_with_provenance_and_archives_the_file(tmp_path):
    store = tmp_path / "store"
    bad_same_text = {"prompt": "p", "chosen": "same", "rejected": "same"}
    source = _write_jsonl(
        tmp_path / "batch1.jsonl", [_pair(0), _pair(1), bad_same_text], extra_lines=["{not json"]
    )
    [result] = ingest_files([source], store, settings=_lenient(), now=T0)

    assert (result.status, result.total, result.valid, result.quarantined) == ("ingested", 4, 2, 2)
    assert result.added == 2 and result.duplicates == 0
    table = read_table(store)
    assert len(table) == 2
    sha = file_sha256(source)
    assert set(table["file_sha256"]) == {sha}
    assert set(table["source_file"]) == {"batch1.jsonl"}
    assert list(table["source_line"]) == [1, 2]
    assert set(table["ingested_at"]) == {T0.isoformat()}
    assert table.loc[0, "prompt"] == [{"role": "user", "content": "Review film number 0."}]
    # The original is archived byte for byte; quarantined rows are kept with reasons.
    archived = store / "archive" / sha / "batch1.jsonl"
    assert archived.read_bytes() == source.read_bytes()
    quarantine = (store / "reports" / sha / "quarantine.jsonl").read_text().splitlines()
    reasons = sorted(json.loads(line)["reason"] for line in quarantine)
    assert reasons == ["chosen_equals_rejected", "malformed_json"]
    [entry] = read_manifest(store)
    assert entry["sha256"] == sha and entry["status"] == "ingested" and entry["added"] == 2


def test_reingesting_the_same_file_adds_nothing(tmp_path):
    store = tmp_path / "store"
    source = _write_jsonl(tmp_path / "b.jsonl", [_pair(0), _pair(1)])
    ingest_files([source], store, now=T0)
    before = read_table(store)
    [again] = ingest_files([source], store, now=T0)
    assert again.status == "already_ingested"
    pd.testing.assert_frame_equal(read_table(store), before)
    assert len(read_manifest(store)) == 1


def test_rows_already_in_the_store_are_deduplicated_by_content(tmp_path):
    store = tmp_path / "store"
    first = _write_jsonl(tmp_path / "a.jsonl", [_pair(0), _pair(1)])
    # Same content with another key order and extra whitespace-free fields: same hash.
    reordered = {
        "rejected": "Film 1 was dull.",
        "prompt": "Review film number 1.",
        "chosen": "Film 1 was wonderful.",
    }
    second = _write_jsonl(tmp_path / "b.jsonl", [reordered, _pair(2), _pair(2)])
    ingest_files([first], store, now=T0)
    [result] = ingest_files([second], store, settings=_lenient(), now=T0)
    # The in-file repeat of pair 2 is quarantined by validation; pair 1 is already stored.
    assert result.valid == 2 and result.added == 1 and result.duplicates == 1
    table = read_table(store)
    assert len(table) == 3
    assert table["content_hash"].is_unique
    assert list(table["source_file"]) == ["a.jsonl", "a.jsonl", "b.jsonl"]


def test_a_file_below_the_valid_fraction_is_archived_but_not_merged(tmp_path):
    store = tmp_path / "store"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [_pair(0)], extra_lines=["{x", "{y", "{z"])
    [result] = ingest_files([bad], store, now=T0)
    assert result.status == "rejected" and result.valid_fraction == pytest.approx(0.25)
    assert len(read_table(store)) == 0
    assert (store / "archive" / result.sha256 / "bad.jsonl").is_file()
    assert read_manifest(store)[0]["status"] == "rejected"


def test_any_past_version_can_be_rebuilt_from_the_archive(tmp_path):
    store = tmp_path / "store"
    files = [
        _write_jsonl(tmp_path / "a.jsonl", [_pair(0), _pair(1)]),
        _write_jsonl(tmp_path / "b.jsonl", [_pair(1), _pair(2), _pair(3, chosen="Great!")]),
    ]
    ingest_files([files[0]], store, now=T0)
    after_first = read_table(store)
    ingest_files([files[1]], store, now=datetime(2026, 2, 1, tzinfo=UTC))
    for path in files:
        path.unlink()  # the originals are gone; the archive is enough

    pd.testing.assert_frame_equal(
        read_table(rebuild_store(store, tmp_path / "v1", upto=1)), after_first
    )
    pd.testing.assert_frame_equal(
        read_table(rebuild_store(store, tmp_path / "v2")), read_table(store)
    )


def test_ingest_command(tmp_path):
    store = tmp_path / "store"
    source = _write_jsonl(tmp_path / "new.jsonl", [_pair(0), _pair(1)])
    runner = CliRunner()
    params = tmp_path / "none.yaml"  # absent: defaults apply
    result = runner.invoke(
        app, ["ingest", str(source), "--store", str(store), "--params", str(params)]
    )
    assert result.exit_code == 0, result.output
    assert "ingested: 2 rows, 2 valid, 0 quarantined, 2 added" in result.output
    result = runner.invoke(
        app, ["ingest", str(source), "--store", str(store), "--params", str(params)]
    )
    assert result.exit_code == 0 and "already ingested" in result.output
    missing = runner.invoke(
        app,
        ["ingest", str(tmp_path / "nope.jsonl"), "--store", str(store), "--params", str(params)],
    )
    assert missing.exit_code == 2 and "no such file" in missing.output
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    linked = runner.invoke(
        app, ["ingest", str(link), "--store", str(store), "--params", str(params)]
    )
    assert linked.exit_code == 2 and "a symbolic link" in linked.output


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_the_store_and_metrics_write_follows_the_umask(tmp_path, umask, mode):
    """Written by atomic replace of a temporary file, yet with the mode `open` would give
    (`tempfile.mkstemp` makes 0600 files: a team's shared store and metrics were private)."""
    import os

    from rlhf_core.files import write_json

    previous = os.umask(umask)
    try:
        store = tmp_path / "store"
        ingest_files([_write_jsonl(tmp_path / "b.jsonl", [_pair(0), _pair(1)])], store, now=T0)
        metrics = write_json(tmp_path / "metrics" / "sft.json", {"loss": 0.5})
    finally:
        os.umask(previous)
    written = [path for path in store.rglob("*") if path.is_file()] + [metrics]
    assert any(path.suffix == ".parquet" for path in written)
    assert {path: path.stat().st_mode & 0o777 for path in written} == dict.fromkeys(written, mode)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_partial_archive_copy_is_replaced_not_reused(tmp_path):
    """A copy cut short (a full disk, a kill) left at archive/<sha>/ was taken as the archive
    by the retry: 152 of 500 rows ingested, exit 0. The archive is now checked by sha256."""
    store = tmp_path / "store"
    source = _write_jsonl(tmp_path / "b.jsonl", [_pair(i) for i in range(40)])
    archived = store / "archive" / file_sha256(source) / "b.jsonl"
    archived.parent.mkdir(parents=True)
    archived.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 3])
    [result] = ingest_files([source], store, now=T0)
    assert (result.status, result.valid, result.added) == ("ingested", 40, 40)
    assert archived.read_bytes() == source.read_bytes()
    assert len(read_table(rebuild_store(store, tmp_path / "rebuilt"))) == 40


def test_a_full_disk_while_archiving_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """ENOSPC in the middle of the copy: an error naming the archive, no partial file at the
    archive's name or beside it, no manifest entry; the retry ingests every row."""
    import errno
    import shutil

    store = tmp_path / "store"
    source = _write_jsonl(tmp_path / "b.jsonl", [_pair(i) for i in range(40)])
    real_copy = shutil.copyfileobj

    def copy_then_fill_the_disk(reader, writer, *args):
        writer.write(reader.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fill_the_disk)
    with pytest.raises(OSError, match=r"cannot archive .*b\.jsonl.*No space left"):
        ingest_files([source], store, now=T0)
    assert [p for p in (store / "archive").rglob("*") if p.is_file()] == []
    assert read_manifest(store) == []
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    [result] = ingest_files([source], store, now=T0)
    assert (result.status, result.added) == ("ingested", 40)


def test_a_symbolic_link_is_refused_and_nothing_it_points_to_is_archived(tmp_path):
    """A link (in data/incoming, or given to `rlhf ingest`) to a file outside the project had
    its target's content archived and quarantined into the DVC-tracked store."""
    secret = tmp_path / "outside" / "credentials.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"aws_secret_access_key": "not-a-real-key"}\n')
    link = tmp_path / "incoming" / "batch.jsonl"
    link.parent.mkdir()
    link.symlink_to(secret)
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"symbolic link .*copy the file"):
        ingest_files([link], store, now=T0)
    stored = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    assert not any(b"not-a-real-key" in content for content in stored)


def test_a_file_refused_whole_leaves_nothing_in_the_store(tmp_path):
    """Over the size limit, or unreadable as a whole: one error naming the incoming file, and
    no archived copy or report without a manifest entry."""
    store = tmp_path / "store"
    ingest_files([_write_jsonl(tmp_path / "good.jsonl", [_pair(0)])], store, now=T0)
    big = _write_jsonl(tmp_path / "big.jsonl", [_pair(i) for i in range(20000)])
    with pytest.raises(ValueError, match=r"big\.jsonl is .* bytes, more than"):
        ingest_files([big], store, settings=ValidationSettings(max_file_mb=1, max_row_mb=1))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\n".join(bytes([128 + i % 100]) * 40 for i in range(3000)))
    with pytest.raises(ValueError) as refused:
        ingest_files([garbage], store)
    assert str(garbage) in str(refused.value) and str(store) not in str(refused.value)
    assert [entry["file"] for entry in read_manifest(store)] == ["good.jsonl"]
    assert [folder.name for folder in (store / "archive").iterdir()] == [
        read_manifest(store)[0]["sha256"]
    ]
    assert len(list((store / "reports").iterdir())) == 1
