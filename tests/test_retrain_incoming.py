"""Tests for the retrain flow's intake (flows/retrain.py: `ingest_incoming`, `move_to_processed`):
a file that cannot be read at all is set aside in data/incoming/unreadable/ with a reason
file, and never blocks the next retrain."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.store import read_manifest, read_table
from rlhf_core.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
retrain_module = load_script(REPO / "flows" / "retrain.py")

# Files up to 50 KiB, records up to 10 KiB: small poison files stand for big ones.
SMALL_LIMITS = ValidationSettings(max_chars=1000, max_row_mb=0.01, max_file_mb=0.05)


def pairs(numbers: range) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Review film {n}.", "chosen": "A fine film.", "rejected": "Bad."}
        for n in numbers
    ]


def write_pairs(path: Path, numbers: range) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in pairs(numbers)), encoding="utf-8")
    return path


def write_poison(incoming: Path, outside: Path) -> dict[str, str]:
    """One file of each whole-file failure; returns name -> words its error must contain."""
    (incoming / "notes.txt").write_text("not preference data")
    write_pairs(incoming / "big.jsonl", range(2000))  # ~150 KB, over the 50 KiB limit
    (incoming / "utf16.csv").write_text("prompt,chosen,rejected\nQ,a,b\n", encoding="utf-16")
    table = pyarrow.Table.from_pylist(pairs(range(50)))
    pyarrow.parquet.write_table(table, incoming / "whole.parquet")
    whole = (incoming / "whole.parquet").read_bytes()
    (incoming / "whole.parquet").unlink()
    (incoming / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    packed = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in pairs(range(50))))
    (incoming / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (incoming / "linked.jsonl").symlink_to(write_pairs(outside, range(100, 105)))
    (incoming / "folder.jsonl").mkdir()
    return {
        "notes.txt": "cannot tell the format",
        "big.jsonl": "more than the 0.05 MiB (52,428 bytes) limit on one data file",
        "utf16.csv": "is not valid UTF-8",
        "cut.parquet": "is not a readable Parquet file",
        "cut.jsonl.gz": "is not a readable gzip file",
        "linked.jsonl": "symbolic link",
        "folder.jsonl": "no such file to ingest",
    }


@pytest.mark.slow
def test_each_kind_of_unreadable_file_is_set_aside_with_its_reason_and_the_next_retrain_goes_on(
    tmp_path: Path,
) -> None:
    incoming, store = tmp_path / "incoming", tmp_path / "store"
    incoming.mkdir()
    expected = write_poison(incoming, tmp_path / "outside.jsonl")
    good = write_pairs(incoming / "good.jsonl", range(5))
    sha256 = {
        name: hashlib.sha256((incoming / name).read_bytes()).hexdigest()
        for name in expected
        if (incoming / name).is_file() and not (incoming / name).is_symlink()
    }
    sizes = {name: (incoming / name).stat().st_size for name in sha256}
    # The directory is passed as the flow never lists one: ingest_incoming copes all the same.
    files = [*retrain_module.incoming_files(incoming), incoming / "folder.jsonl"]
    assert len(files) == len(expected) + 1

    records = {r["file"]: r for r in retrain_module.ingest_incoming(files, store, SMALL_LIMITS)}

    assert (records["good.jsonl"]["status"], records["good.jsonl"]["added"]) == ("ingested", 5)
    assert (incoming / "processed" / good.name).is_file()
    for name, words in expected.items():
        assert records[name]["status"] == "unreadable" and records[name]["added"] == 0
        assert words in records[name]["error"], name
        moved = incoming / "unreadable" / name
        assert moved.is_symlink() if name == "linked.jsonl" else moved.exists(), name
        reason = json.loads((incoming / "unreadable" / f"{name}.reason.json").read_text())
        assert reason["file"] == name and reason["moved_to"] == f"unreadable/{name}"
        assert reason["error"] == records[name]["error"] and reason["error_type"] == (
            "FileNotFoundError" if name == "folder.jsonl" else "ValueError"
        )
        assert datetime.fromisoformat(reason["set_aside_at"]).utcoffset() == timedelta(0)
        assert reason["sha256"] == sha256.get(name) and reason["bytes"] == sizes.get(name)
    assert (tmp_path / "outside.jsonl").is_file()  # a link is moved, never its target
    # Refused before the store archived it (the other refusals are archived by the store).
    assert not list((store / "archive").glob("*/big.jsonl"))
    assert [entry["file"] for entry in read_manifest(store)] == ["good.jsonl"]

    # The next retrain sees none of them and ingests its new file.
    assert retrain_module.incoming_files(incoming) == []
    write_pairs(incoming / "more.jsonl", range(5, 9))
    [more] = retrain_module.ingest_incoming(
        retrain_module.incoming_files(incoming), store, SMALL_LIMITS
    )
    assert (more["file"], more["status"], more["added"]) == ("more.jsonl", "ingested", 4)
    assert len(read_table(store)) == 9


def test_a_second_unreadable_file_of_the_same_name_keeps_both_and_both_reasons(
    tmp_path: Path,
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    first = retrain_module.move_to_processed(
        write_pairs(incoming / "a.jsonl", range(1)), "unreadable", {"error": "first"}
    )
    second = retrain_module.move_to_processed(
        write_pairs(incoming / "a.jsonl", range(2)), "unreadable", {"error": "second"}
    )
    assert first != second and first.is_file() and second.is_file()
    for moved, error in [(first, "first"), (second, "second")]:
        reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
        assert reason == {"error": error, "moved_to": f"unreadable/{moved.name}"}


def test_a_store_that_cannot_be_written_stops_the_ingest_and_leaves_the_file(
    tmp_path: Path,
) -> None:
    """Not the file's fault (here the store path is a file; a full disk alike): raised, and
    the file stays in incoming/ for the next retrain instead of being set aside."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    good = write_pairs(incoming / "good.jsonl", range(3))
    store = tmp_path / "store"
    store.write_text("a file where the store's folder should be")
    with pytest.raises(FileExistsError):
        retrain_module.ingest_incoming([good], store, SMALL_LIMITS)
    assert good.is_file() and not (incoming / "unreadable").exists()


INGEST_WITHOUT_FILE_OVERRIDE = """
import json, sys
from pathlib import Path
from rlhf_core.config.data import ValidationSettings
from rlhf_core.scripts import load_script
retrain = load_script(Path("flows/retrain.py"))
incoming, store = Path(sys.argv[1]), Path(sys.argv[2])
records = retrain.ingest_incoming(retrain.incoming_files(incoming), store, ValidationSettings())
print(json.dumps(records))
"""


# Root reads any file whatever its mode; without these two capabilities it may not.
WITHOUT_FILE_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search"]
WITHOUT_FILE_OVERRIDE += ["--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_a_file_the_process_may_not_open_is_set_aside_with_its_reason(tmp_path: Path) -> None:
    """A real PermissionError: a file of mode 000, ingested by a process that may not read
    it (run as root, the process drops root's right to override file modes)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root, and setpriv (util-linux) is not there to drop its rights")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    locked = write_pairs(incoming / "locked.jsonl", range(3))
    write_pairs(incoming / "open.jsonl", range(3, 6))
    os.chmod(locked, 0o000)
    prefix = WITHOUT_FILE_OVERRIDE if os.geteuid() == 0 else []
    command = [sys.executable, "-c", textwrap.dedent(INGEST_WITHOUT_FILE_OVERRIDE)]
    result = subprocess.run(
        [*prefix, *command, str(incoming), str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["file"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert records["open.jsonl"]["status"] == "ingested"
    assert records["locked.jsonl"]["status"] == "unreadable"
    assert "Permission denied" in records["locked.jsonl"]["error"]
    reason = json.loads((incoming / "unreadable" / "locked.jsonl.reason.json").read_text())
    assert reason["error_type"] == "PermissionError" and reason["sha256"] is None
    assert reason["bytes"] == (incoming / "unreadable" / "locked.jsonl").stat().st_size > 0
