"""Property-based fuzzing of every reader format, every adapter and the row checks.

Random bytes and random nested JSON (deep nesting, huge integers, NaN and infinities, lone
surrogates and control characters, wrong types, near-miss chat messages) go through the real
`read_records`, `adapt_record`, `inspect_row` and `validate_files`. The only outcomes allowed
are rows, rejections each with a reason, or the documented whole-file ValueError; and every
record is counted once: rows + rejections == records written.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.adapters import AdapterError, adapt_record
from rlhf_core.data.expectations import inspect_row
from rlhf_core.data.raw_records import MAX_RAW_CHARS
from rlhf_core.data.readers import read_records
from rlhf_core.data.schemas import KINDS
from rlhf_core.data.validation import validate_files

FORMATS = ("jsonl", "json", "csv", "parquet")
FIELDS = (
    "prompt", "chosen", "rejected", "completion", "messages", "text", "responses",
    "completions", "ranking", "margin", "meta", "split", "source", "annotator", "created_at",
)  # fmt: skip
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text with lone surrogates, control characters, NUL and astral characters.
texts = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(
    ["", "\x00", "\ud800", "\n\nHuman: hi\n\nAssistant: yo", "validation", "NaN", "1e400"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(300, 5000).map(lambda digits: 10**digits)  # past float and str() limits
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | scalars},
    optional={"content": scalars, "name": texts},
)
json_values = st.recursive(
    scalars | messages,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | texts, children, max_size=4)
    ),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(messages, max_size=3))
maybe_records = records | json_values  # a record may not even be an object


def deep(depth: int) -> str:
    """JSON text nested `depth` levels deep (past what json.loads can recurse through)."""
    return "[" * depth + "]" * depth


def write_records(values: list[Any], path: Path, file_format: str) -> int:
    """Write `values` as a file of `file_format`; return the number of records written."""
    if file_format == "jsonl":
        path.write_text("".join(_safe_dumps(v) + "\n" for v in values), "utf-8", "surrogatepass")
    elif file_format == "json":
        path.write_text("[" + ",".join(map(_safe_dumps, values)) + "]", "utf-8", "surrogatepass")
    elif file_format == "csv":
        objects = [v if isinstance(v, dict) else {"prompt": v} for v in values]
        header = sorted({key for record in objects for key in record}) or ["prompt"]
        with open(path, "w", encoding="utf-8", errors="surrogatepass", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for record in objects:
                cells = [record.get(key) for key in header]
                writer.writerow(v if isinstance(v, str) else _safe_dumps(v) for v in cells)
    else:
        objects = [v if isinstance(v, dict) else {"prompt": v} for v in values]
        try:
            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(objects), path)
        except (pyarrow.ArrowException, TypeError, OverflowError, ValueError):
            # Arrow needs one type per column, UTF-8 names and no empty structs: such values
            # go in as their JSON text, names with lone surrogates as their JSON escapes.
            table = pyarrow.Table.from_pylist(
                [{_safe_dumps(k)[1:-1]: _safe_dumps(v) for k, v in r.items()} for r in objects]
            )
            pyarrow.parquet.write_table(table, path)
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows  # [{}] is a table of no rows
    return len(values)


def _safe_dumps(value: Any) -> str:
    """JSON text; an integer too long for int-to-str conversion is written digit by digit."""
    try:
        return json.dumps(value, allow_nan=True)
    except ValueError:
        return json.dumps(_short_ints(value), allow_nan=True)


def _short_ints(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10_000:
        return 10**300
    if isinstance(value, list):
        return [_short_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _short_ints(item) for key, item in value.items()}
    return value


def check_read(path: Path, kind: str, written: int | None) -> None:
    """read_records gives rows and rejections with reasons, or the whole-file ValueError."""
    try:
        result = read_records([path], kind)
    except ValueError as error:
        assert str(path) in str(error)  # a whole-file error names its file
        return
    rejected = result.rejected.to_dict(orient="records")
    for rejection in rejected:
        assert rejection["reason"] and 0 < len(rejection["detail"]) < 1000
        assert len(rejection["raw"]) <= MAX_RAW_CHARS
        assert len(rejection["raw_sha256"]) == 64 and rejection["raw_bytes"] >= 0
    if written is not None:
        assert len(result.frame) + len(rejected) == written
    lines = list(result.frame["source_line"]) + [r["source_line"] for r in rejected]
    assert len(lines) == len(set(lines))  # each record once


@pytest.mark.parametrize("file_format", FORMATS)
@settings(FUZZ, max_examples=40)
@given(values=st.lists(maybe_records, max_size=6), kind=st.sampled_from(KINDS))
def test_random_records_in_every_format_are_rows_or_rejections(
    tmp_path: Path, file_format: str, values: list[Any], kind: str
) -> None:
    path = tmp_path / f"fuzz.{file_format}"
    written = write_records(values, path, file_format)
    # CSV and Parquet rows are objects by construction; CSV drops rows whose cells are blank.
    check_read(path, kind, written if file_format in ("jsonl", "json", "parquet") else None)


@pytest.mark.parametrize("file_format", [*FORMATS, "jsonl.gz"])
@settings(FUZZ, max_examples=40)
@given(data=st.binary(max_size=3000), kind=st.sampled_from(KINDS))
def test_random_bytes_in_every_format_are_rows_rejections_or_one_file_error(
    tmp_path: Path, file_format: str, data: bytes, kind: str
) -> None:
    path = tmp_path / f"fuzz.{file_format}"
    path.write_bytes(data)
    written = None
    if file_format == "jsonl":
        written = sum(1 for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())
    check_read(path, kind, written)


SEED_ROWS = [
    {"prompt": f"Review film {n}.", "chosen": "Great film.", "rejected": "Dull.", "margin": 1.0}
    for n in range(40)
]


@pytest.mark.parametrize("file_format", [*FORMATS, "jsonl.gz"])
@settings(FUZZ, max_examples=40)
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    keep=st.floats(0, 1),
    kind=st.sampled_from(KINDS),
)
def test_a_damaged_file_of_every_format_is_rows_rejections_or_one_file_error(
    tmp_path: Path, file_format: str, edits: list[tuple[float, int]], keep: float, kind: str
) -> None:
    """A valid file with bytes overwritten and maybe cut short: reaches the parsers' deeper
    paths (Parquet pages and footer, gzip members, CSV quoting) that random bytes do not."""
    seed = tmp_path / f"seed.{file_format}"
    if file_format == "jsonl.gz":
        seed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in SEED_ROWS).encode()))
    else:
        write_records(SEED_ROWS, seed, file_format)
    data = bytearray(seed.read_bytes())
    for where, byte in edits:
        data[int(where * len(data))] = byte
    path = tmp_path / f"damaged.{file_format}"
    path.write_bytes(bytes(data[: max(1, int(keep * len(data)))] if keep < 0.5 else data))
    check_read(path, kind, None)


@settings(FUZZ, max_examples=200)
@given(record=records, kind=st.sampled_from(KINDS))
def test_every_adapter_converts_a_random_record_or_names_its_shape(
    record: dict[str, Any], kind: str
) -> None:
    try:
        row = adapt_record(record, kind)
    except AdapterError as error:
        assert error.reason and 0 < len(error.detail) < 1000
    else:
        assert isinstance(row, dict)


@settings(FUZZ, max_examples=200)
@given(row=records, kind=st.sampled_from(KINDS))
def test_row_checks_never_raise_on_a_random_row(row: dict[str, Any], kind: str) -> None:
    findings = inspect_row(row, kind, ValidationSettings())
    assert all(0 < len(note) < 1000 for note in findings.notes.values())


@settings(FUZZ, max_examples=6)
@given(
    values=st.lists(maybe_records, min_size=1, max_size=12),
    kind=st.sampled_from(KINDS),
    file_format=st.sampled_from(FORMATS),
)
def test_validation_puts_every_random_record_in_valid_or_quarantine(
    tmp_path_factory: pytest.TempPathFactory,
    values: list[Any],
    kind: str,
    file_format: str,
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / f"fuzz.{file_format}"
    written = write_records(values, path, file_format)
    try:
        report = validate_files([path], kind, folder / "out", data_docs=False)
    except ValueError as error:
        assert str(path) in str(error)
        return
    quarantine = [
        json.loads(line) for line in (folder / "out" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert (
        report["total"]
        == report["valid"] + report["quarantined"]
        == (written if file_format != "csv" else report["total"])
    )
    assert len(quarantine) == report["quarantined"]
    assert all(record["reason"] and len(record["raw"]) <= MAX_RAW_CHARS for record in quarantine)
    assert pyarrow.parquet.read_table(folder / "out" / "valid.parquet").num_rows == report["valid"]


@pytest.mark.parametrize("file_format", ["jsonl", "json", "csv"])
def test_nesting_past_the_recursion_limit_is_a_rejection(tmp_path: Path, file_format: str) -> None:
    path = tmp_path / f"deep.{file_format}"
    poison = {"prompt": "p", "chosen": "c", "rejected": "r"}
    if file_format == "csv":
        path.write_text(f"prompt,chosen,rejected\np,{deep(50_000)},r\n")
    else:
        text = json.dumps(poison).replace('"c"', deep(50_000))
        path.write_text(text + "\n" if file_format == "jsonl" else "[" + text + "]")
    check_read(path, "preference", 1)


ATHERIS_HARNESS = """
import os, sys, tempfile
import atheris

with atheris.instrument_imports(include=["rlhf_core"]):
    from rlhf_core.data.readers import read_records

SUFFIXES = ["jsonl", "json", "csv", "parquet", "jsonl.gz"]
KINDS = ["sft", "preference", "ranked", "prompts"]
FOLDER = tempfile.mkdtemp()


def one_input(data):
    if len(data) < 2:
        return
    path = os.path.join(FOLDER, "fuzz." + SUFFIXES[data[0] % len(SUFFIXES)])
    with open(path, "wb") as handle:
        handle.write(data[2:])
    try:
        result = read_records([path], KINDS[data[1] % len(KINDS)])
    except ValueError as error:
        if path not in str(error):
            raise
        return
    if not all(result.rejected["reason"]):
        raise AssertionError("a rejection without a reason")


atheris.Setup(sys.argv, one_input)
atheris.Fuzz()
"""


@pytest.mark.slow
def test_coverage_guided_fuzzing_of_the_readers_finds_no_crash(tmp_path: Path) -> None:
    """atheris (libFuzzer) mutates seed files of each format towards new branches of the
    readers and adapters; a crash is any exception other than the whole-file ValueError naming
    the file. atheris is in the dev extra where it has wheels (Linux x86-64); elsewhere this
    test says it is not installed."""
    import subprocess
    import sys

    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed = '{"prompt": "Q", "chosen": "a", "rejected": "b"}\n'
    (corpus / "jsonl").write_bytes(b"\x00\x01" + seed.encode() * 2)
    (corpus / "csv").write_bytes(b'\x03\x01prompt,chosen,rejected\nQ,a,b\n"R","c ""x""",d\n')
    (corpus / "json").write_bytes(b'\x01\x02[{"prompt": "Q", "responses": ["a", "b"]}]')
    result = subprocess.run(
        [sys.executable, "-c", ATHERIS_HARNESS, "-runs=1500", "-max_len=2048", str(corpus)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 1500 runs" in result.stderr
