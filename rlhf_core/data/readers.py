"""Read data files of any supported format into canonical rows, with provenance and rejections.

Formats, chosen by extension or directory:

- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, streamed line by line and decoded line
  by line, so one malformed or non-UTF-8 line is rejected while the rest are kept. Blank lines
  are skipped and not counted.
- ``.json``: an array of records, ``{"data": [...]}``, or split keys such as
  ``{"train": [...], "eval": [...]}`` (``test``/``validation`` count as eval), which set
  ``split``.
- ``.parquet``: read in record batches.
- ``.csv``: a header row, then one record per row. A ``prompt``, ``responses``, ``messages``,
  ``completions``, ``ranking`` or ``meta`` cell holding a JSON list/object is decoded; empty
  cells become None; a ``margin`` cell that parses as a number becomes a float.
- a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``,
  whose split names set ``split``: train -> "train", validation/test/eval -> "eval").
- a Hugging Face hub dataset id (a string that is not a local path), loaded with
  ``datasets.load_dataset`` unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set.

Every record is converted by ``adapters.adapt_record``. Parse-level failures become rows of
``ReadResult.rejected`` (never exceptions), so for every input the number of rows plus the
number of rejections equals the number of non-blank records. Field values are not checked
here: that is validation's job.

Poison input is bounded: a file larger than `max_file_bytes` is refused before it is read; a
JSON Lines or CSV record larger than `max_row_bytes` is read through in blocks, never held
whole, and rejected as ``row_too_large`` (a JSON or Parquet record too, once parsed); a
rejection keeps at most MAX_RAW_CHARS characters of the record's text, with the sha256 and
byte size of the whole record. A file with UNREADABLE_RUN records that fail to parse while
fewer than UNREADABLE_RUN / 100 parse (random bytes, a binary file given the wrong
extension) is not a file of its format: it is refused as a whole rather than turned into a
quarantine larger than itself. So is a CSV file whose header is not valid UTF-8. Whole-file
failures are ValueError (or OSError from the file system), each naming the file.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd

from rlhf_core.data.adapters import AdapterError, adapt_record
from rlhf_core.data.csv_records import read_csv
from rlhf_core.data.raw_records import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_ROW_BYTES,
    MAX_RAW_CHARS,
    REJECTED_COLUMNS,
    FailedRecord,
    OversizedRecord,
    ParsedRecord,
    ReadLimits,
    bounded_lines,
    failed_record,
    load_json_record,
    raw_digest,
)
from rlhf_core.data.schemas import (
    PROVENANCE_FIELDS,
    SPLIT_FIELD,
    canonical_json,
    canonical_split_name,
    check_kind,
    schema_fields,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# A file whose read-level failures reach this many while fewer than 1 in 100 of this many
# records parsed is not a file of its format (random bytes, a binary file): refused whole.
UNREADABLE_RUN = 1000
FILE_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json"}
FILE_FORMATS |= {".parquet": "parquet", ".csv": "csv"}
PARQUET_BATCH_ROWS = 1024

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE_WORDS = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ReadResult:
    """Canonical rows read from some files, and the records that could not be read."""

    frame: pd.DataFrame  # the kind's fields, `split`, `source_file`, `source_line`
    rejected: pd.DataFrame  # `source_file`, `source_line`, `reason`, `detail`, `raw`, ...


def _jsonl_line(line_number: int, line: bytes) -> ParsedRecord | FailedRecord:
    """Parse one non-blank JSONL line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"the line is not valid UTF-8 ({error.reason} at byte {error.start})"
        return failed_record(line_number, "invalid_utf8", detail, line)
    value = load_json_record(text, line_number, "line")
    if isinstance(value, FailedRecord):
        return value
    return ParsedRecord(line_number, value, raw_text=text)


def _read_jsonl(path: Path, limits: ReadLimits) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a JSON Lines file, read in binary so each line is decoded on its own."""
    compressed = path.name.lower().endswith(".gz")
    opener: Any = gzip.open if compressed else open
    handle: BinaryIO
    try:
        with opener(path, "rb") as handle:
            for line_number, line in enumerate(bounded_lines(handle, limits, path), start=1):
                if isinstance(line, OversizedRecord):
                    yield line.failure(line_number, limits.row_bytes)
                    continue
                if line_number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                line = line.strip()
                if line:
                    yield _jsonl_line(line_number, line)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a readable gzip file ({error or type(error).__name__}); compress "
            "it again or set it aside"
        ) from error


def _json_record_lists(document: Any) -> list[tuple[str | None, Any]] | None:
    """(split, records) groups of a JSON document, or None if its layout is not recognised."""
    if isinstance(document, list):
        return [(None, document)]
    if not isinstance(document, dict) or not document:
        return None
    if isinstance(document.get("data"), list):
        return [(None, document["data"])]  # other top-level keys are metadata
    splits = {key: canonical_split_name(key) for key in document}
    if all(splits.values()) and all(isinstance(records, list) for records in document.values()):
        return [(splits[key], records) for key, records in document.items()]
    return None


def _read_json(path: Path, limits: ReadLimits) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a JSON file holding an array, ``{"data": [...]}`` or split keys.

    The document is parsed whole (JSON has no record boundaries to stream by), so the file
    limit is what bounds its memory; JSON Lines suits large data sets better.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        detail = f"the file is not valid UTF-8 ({error.reason} at byte {error.start})"
        yield failed_record(line, "invalid_utf8", detail, data)
        return
    del data
    if not text.strip():
        return
    document = load_json_record(text, 1, "file")
    if isinstance(document, FailedRecord):
        yield document
        return
    groups = _json_record_lists(document)
    if groups is None:
        if not isinstance(document, dict):
            yield ParsedRecord(1, document)  # a bare number or string: rejected as not_an_object
            return
        detail = (
            'a JSON file must hold an array of records, {"data": [...]}, or split keys such '
            'as {"train": [...], "eval": [...]}'
        )
        yield failed_record(1, "unrecognised_shape", detail, text)
        return
    index = 0
    for split, records in groups:
        for record in records:
            index += 1
            yield ParsedRecord(index, record, split=split)


def _read_parquet(path: Path, limits: ReadLimits) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a Parquet file, read in batches of PARQUET_BATCH_ROWS.

    A damaged file (bad magic bytes, cut short, corrupt pages) is one ValueError naming it,
    whether the damage shows when it is opened or only at a later batch.
    """
    import pyarrow
    import pyarrow.parquet

    if path.stat().st_size == 0:
        return
    index = 0
    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
        for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                index += 1
                yield ParsedRecord(index, record)
    # UnicodeDecodeError: a string column holding bytes that are not UTF-8, which Parquet's
    # strings must be (pyarrow checks only when it converts a batch)
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a readable Parquet file ({error}) after {index} record(s); "
            "write it again or set it aside"
        ) from error


def _read_hf_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict,
) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a Dataset, or of each split of a DatasetDict in order (split set by name)."""
    groups = dataset.items() if hasattr(dataset, "items") else [(None, dataset)]
    index = 0
    for split_name, split_dataset in groups:
        split = canonical_split_name(split_name)
        if split_name is not None and split is None:
            logger.warning("split %r is neither train nor eval; its rows get no split", split_name)
        for record in split_dataset:
            index += 1
            yield ParsedRecord(index, record, split=split)


def _read_saved_dataset(path: Path) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a directory written by ``save_to_disk`` of a Dataset or a DatasetDict."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(
            f"directory {path} is not a datasets save_to_disk directory (no dataset_dict.json "
            "or state.json); pass a data file or a directory written by save_to_disk"
        )
    import datasets

    yield from _read_hf_dataset(datasets.load_from_disk(str(path)))


def hub_access_is_off() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` forbids Hugging Face hub access."""
    return any(
        os.environ.get(variable, "").strip().lower() in _TRUE_WORDS
        for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _read_hub_dataset(dataset_id: str) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of every split of a Hugging Face hub dataset."""
    if hub_access_is_off():
        raise ValueError(
            f"{dataset_id!r} is not a local file or directory, so it was taken as a Hugging Face "
            "hub dataset id, but hub access is off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is "
            "set); pass a local path, or unset those variables to download it"
        )
    import datasets

    yield from _read_hf_dataset(datasets.load_dataset(dataset_id))


def file_format(path: str | Path) -> str | None:
    """The format name for a file's extension (case-insensitive), or None if unknown."""
    name = Path(path).name.lower()
    for suffix, format_name in FILE_FORMATS.items():
        if name.endswith(suffix):
            return format_name
    return None


_FORMAT_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "csv": read_csv,
}


def check_file_size(path: str | Path, max_bytes: int) -> None:
    """Raise ValueError when a data file is larger than `max_bytes` (it is not read at all)."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{path} is {size:,} bytes, more than the {max_bytes / 2**20:.3g} MiB "
            f"({max_bytes:,} bytes) limit on one data file (data.validation.max_file_mb in "
            "params.yaml); split the file or raise the limit"
        )


def _records_of(source: str, limits: ReadLimits) -> Iterator[ParsedRecord | FailedRecord]:
    """The records of one source (file, saved dataset directory or hub id), by its format."""
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path)
    format_name = file_format(path)
    if path.is_file():
        if format_name is None:
            raise ValueError(
                f"cannot tell the format of {source!r} from its extension; use .jsonl, "
                ".jsonl.gz, .json, .parquet, .csv or a datasets save_to_disk directory"
            )
        check_file_size(path, limits.file_bytes)
        return _FORMAT_READERS[format_name](path, limits)
    if format_name is None and _HUB_ID.match(source):
        return _read_hub_dataset(source)
    raise FileNotFoundError(
        f"data file {source!r} does not exist (relative to {os.getcwd()}); check the path"
    )


def _canonical_row(parsed: ParsedRecord, kind: str) -> dict[str, Any]:
    """The canonical row of a parsed record; raises AdapterError if it cannot be converted."""
    if not isinstance(parsed.value, Mapping):
        type_name = "null" if parsed.value is None else type(parsed.value).__name__
        raise AdapterError("not_an_object", f"the record is a {type_name}, not an object")
    row = adapt_record(parsed.value, kind)
    if row.get(SPLIT_FIELD) is None:
        row[SPLIT_FIELD] = parsed.split
    return row


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A frame of object columns (so lists, dicts and None survive), `source_line` as int64."""
    data = {
        column: pd.Series([row.get(column) for row in rows], dtype=object) for column in columns
    }
    frame = pd.DataFrame(data, columns=list(columns))
    frame["source_line"] = frame["source_line"].astype("int64")
    return frame


def value_exceeds(value: Any, max_bytes: int) -> bool:
    """Whether a parsed value's JSON text would be longer than `max_bytes`, estimated from
    its strings and items without serialising it (and without recursion, however deep)."""
    pending, size = [value], 0
    while pending:
        item = pending.pop()
        if isinstance(item, str | bytes):
            size += len(item) + 2
        elif isinstance(item, Mapping):
            size += 2 + len(item)
            for key, nested in item.items():
                pending += (key, nested)
        elif isinstance(item, list | tuple):
            size += 2 + len(item)
            pending.extend(item)
        else:
            size += 8
        if size > max_bytes:
            return True
    return False


def _checked(item: ParsedRecord | FailedRecord, limits: ReadLimits) -> ParsedRecord | FailedRecord:
    """A parsed record too large for the row limit (JSON, Parquet and datasets records, which
    are parsed before they can be measured) as a row_too_large rejection."""
    if isinstance(item, FailedRecord) or item.raw_text is not None:
        return item  # JSON Lines and CSV records were measured as they were read
    if not value_exceeds(item.value, limits.row_bytes):
        return item
    text = item.shown()
    sha256, size = raw_digest(text)
    prefix = text[:MAX_RAW_CHARS].encode("utf-8", errors="surrogatepass")
    return OversizedRecord(prefix, sha256, size).failure(item.line, limits.row_bytes)


def _rejection(provenance: dict[str, Any], item: FailedRecord) -> dict[str, Any]:
    return {
        **provenance,
        "reason": item.reason,
        "detail": item.detail,
        "raw": item.raw,
        "raw_sha256": item.raw_sha256,
        "raw_bytes": item.raw_bytes,
    }


def _refuse_unreadable(source_file: str, first: FailedRecord, parsed: int) -> None:
    """Raise for a file that is mostly records that do not parse (see UNREADABLE_RUN)."""
    format_name = file_format(source_file) or "data"
    raise ValueError(
        f"{source_file}: {UNREADABLE_RUN} of its records could not be read as {format_name} "
        f"and only {parsed} could (the first failure, line {first.line}: {first.detail}); it "
        f"is not a {format_name} file or it is damaged, so it is refused as a whole: fix or "
        "convert it"
    )


def read_records(
    paths: Sequence[str | Path] | str | Path,
    kind: str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> ReadResult:
    """Read data files (or saved datasets, or hub ids) as canonical rows of `kind`.

    Returns the rows (``frame``: the kind's fields with None where absent, ``split``,
    ``source_file`` as given and 1-based ``source_line``: the physical line for JSONL and CSV,
    whose header is line 1, the record's position for JSON, Parquet and datasets) and the
    records that could not be read (``rejected``: ``source_file``, ``source_line``, ``reason``,
    ``detail``, ``raw`` (at most MAX_RAW_CHARS characters of the record's text),
    ``raw_sha256`` and ``raw_bytes`` (of the whole record)). A record over `max_row_bytes` is
    rejected as ``row_too_large``.

    Raises FileNotFoundError for a missing path; ValueError for an unknown kind or file
    extension, a hub id while hub access is off, a file over `max_file_bytes`, a file of
    mostly unparseable records (see UNREADABLE_RUN), a CSV header that is not UTF-8, or a
    damaged Parquet or gzip file or CSV quoting; OSError (e.g. PermissionError) when the
    file system refuses the file.
    """
    check_kind(kind)
    limits = ReadLimits(file_bytes=max_file_bytes, row_bytes=max_row_bytes)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for path in paths:
        source_file = str(path)
        rows_before, rejected_before = len(rows), len(rejected)
        failures: list[FailedRecord] = []  # read-level, of this file
        parsed = 0
        for item in _records_of(source_file, limits):
            item = _checked(item, limits)
            provenance = {"source_file": source_file, "source_line": item.line}
            if isinstance(item, FailedRecord):
                rejected.append(_rejection(provenance, item))
                if len(failures) < UNREADABLE_RUN:
                    failures.append(item)
                    if len(failures) == UNREADABLE_RUN and parsed * 100 < UNREADABLE_RUN:
                        _refuse_unreadable(source_file, failures[0], parsed)
                continue
            parsed += 1
            try:
                rows.append({**_canonical_row(item, kind), **provenance})
            except AdapterError as error:
                failure = failed_record(item.line, error.reason, error.detail, item.shown())
                rejected.append(_rejection(provenance, failure))
        logger.info(
            "read %d %s rows from %s (%d rejected)",
            len(rows) - rows_before,
            kind,
            source_file,
            len(rejected) - rejected_before,
        )
    columns = (*schema_fields(kind), SPLIT_FIELD, *PROVENANCE_FIELDS)
    return ReadResult(frame=_frame(rows, columns), rejected=_frame(rejected, REJECTED_COLUMNS))


def to_hf_dataset(frame: pd.DataFrame) -> datasets.Dataset:
    """A ``datasets.Dataset`` of a canonical frame, for training stages.

    Message lists survive as lists of ``{"role", "content"}`` structs. A ``meta`` value that
    is not a string is stored as its canonical JSON text, because Arrow needs one type per
    column and ``meta`` is free-form. The frame's index is dropped.
    """
    import datasets
    import pyarrow

    columns = {column: frame[column].tolist() for column in frame.columns}
    if "meta" in columns:
        columns["meta"] = [
            value if value is None or isinstance(value, str) else canonical_json(value)
            for value in columns["meta"]
        ]
    try:
        return datasets.Dataset.from_dict(columns)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        raise ValueError(
            f"cannot store the frame as a datasets.Dataset ({error}); a column mixes value "
            "types, so validate the data before converting it"
        ) from error
