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
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd

from rlhf_core.data.adapters import AdapterError, adapt_record
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

REJECTED_COLUMNS = ("source_file", "source_line", "reason", "detail", "raw")
MAX_RAW_CHARS = 2000
CSV_JSON_FIELDS = ("prompt", "responses", "messages", "completions", "ranking", "meta")
FILE_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json"}
FILE_FORMATS |= {".parquet": "parquet", ".csv": "csv"}
PARQUET_BATCH_ROWS = 1024

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUE_WORDS = {"1", "true", "yes", "on"}
# Invalid UTF-8 bytes, as `errors="surrogateescape"` keeps them in decoded text.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Long responses can exceed the csv module's default cell limit of 128 KiB.
CSV_MAX_CELL_CHARS = 2**31 - 1


@dataclass(frozen=True)
class ReadResult:
    """Canonical rows read from some files, and the records that could not be read."""

    frame: pd.DataFrame  # the kind's fields, `split`, `source_file`, `source_line`
    rejected: pd.DataFrame  # `source_file`, `source_line`, `reason`, `detail`, `raw`


@dataclass(frozen=True)
class _Parsed:
    """A record a format reader could parse (not yet known to be an object)."""

    line: int
    value: Any
    raw_text: str | None = None  # the record's own text where the format has one
    split: str | None = None  # the split its container (JSON key, DatasetDict) implies

    def shown(self) -> str:
        """The record's text for a rejection report."""
        if self.raw_text is not None:
            return self.raw_text
        try:
            return canonical_json(self.value)
        except (TypeError, ValueError):
            return repr(self.value)


@dataclass(frozen=True)
class _Failure:
    """A record a format reader could not parse."""

    line: int
    reason: str
    detail: str
    raw: str


def _clip(text: str) -> str:
    return text[:MAX_RAW_CHARS]


# json.loads recurses once per level of nesting; a value deeper than the interpreter's stack
# (a poison row, or a hostile one) raised RecursionError and lost the whole file.
TOO_DEEP = "the value nests lists or objects deeper than a JSON reader can follow"


def _bytes_as_text(data: bytes) -> str:
    """Text of possibly invalid UTF-8 bytes, invalid bytes shown as escapes like \\xff."""
    return data.decode("utf-8", errors="backslashreplace")


def _jsonl_line(line_number: int, line: bytes) -> _Parsed | _Failure:
    """Parse one non-blank JSONL line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"the line is not valid UTF-8 ({error.reason} at byte {error.start})"
        return _Failure(line_number, "invalid_utf8", detail, _clip(_bytes_as_text(line)))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        detail = f"the line is not valid JSON ({error.msg} at column {error.colno})"
        return _Failure(line_number, "malformed_json", detail, _clip(text))
    except RecursionError:
        return _Failure(line_number, "too_deeply_nested", TOO_DEEP, _clip(text))
    return _Parsed(line_number, value, raw_text=_clip(text))


def _read_jsonl(path: Path) -> Iterator[_Parsed | _Failure]:
    """Records of a JSON Lines file, read in binary so each line is decoded on its own."""
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    handle: BinaryIO
    with opener(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line_number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            line = line.strip()
            if line:
                yield _jsonl_line(line_number, line)


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


def _read_json(path: Path) -> Iterator[_Parsed | _Failure]:
    """Records of a JSON file holding an array, ``{"data": [...]}`` or split keys."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        detail = f"the file is not valid UTF-8 ({error.reason} at byte {error.start})"
        yield _Failure(line, "invalid_utf8", detail, _clip(_bytes_as_text(data)))
        return
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        detail = f"the file is not valid JSON ({error.msg} at line {error.lineno})"
        yield _Failure(error.lineno, "malformed_json", detail, _clip(text))
        return
    except RecursionError:
        yield _Failure(1, "too_deeply_nested", TOO_DEEP, _clip(text))
        return
    groups = _json_record_lists(document)
    if groups is None:
        if not isinstance(document, dict):
            yield _Parsed(1, document)  # a bare number or string: rejected as not_an_object
            return
        detail = (
            'a JSON file must hold an array of records, {"data": [...]}, or split keys such '
            'as {"train": [...], "eval": [...]}'
        )
        yield _Failure(1, "unrecognised_shape", detail, _clip(text))
        return
    index = 0
    for split, records in groups:
        for record in records:
            index += 1
            yield _Parsed(index, record, split=split)


def _csv_cell(field: str, cell: str) -> Any:
    """A CSV cell as a value: None if empty, decoded JSON for list/dict fields, float margin."""
    if cell == "":
        return None
    if field in CSV_JSON_FIELDS and cell.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(cell)
        except (json.JSONDecodeError, RecursionError):
            return cell  # kept as text: validation rejects it with the field's reason
        return decoded if isinstance(decoded, list | dict) else cell
    if field == "margin":
        try:
            return float(cell)
        except ValueError:
            return cell
    return cell


def _csv_row(line: int, header: list[str], cells: list[str], raw: str) -> _Parsed | _Failure:
    """One CSV data row as a record, or the reason it cannot be one."""
    if _ESCAPED_BYTE.search(raw):
        shown = _bytes_as_text(raw.encode("utf-8", errors="surrogateescape"))
        return _Failure(line, "invalid_utf8", "the row is not valid UTF-8", _clip(shown))
    if len(cells) > len(header):
        detail = f"the row has {len(cells)} cells but the header names {len(header)} columns"
        return _Failure(line, "unrecognised_shape", detail, _clip(raw))
    record = {field: _csv_cell(field, cell) for field, cell in zip(header, cells, strict=False)}
    return _Parsed(line, record, raw_text=_clip(raw))


def _read_csv(path: Path) -> Iterator[_Parsed | _Failure]:
    """Records of a CSV file with a header; a row's line is the physical line it starts on."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        consumed: list[str] = []  # physical lines of the row being read

        def lines() -> Iterator[str]:
            for line in handle:
                consumed.append(line)
                yield line

        csv.field_size_limit(max(csv.field_size_limit(), CSV_MAX_CELL_CHARS))
        reader = csv.reader(lines())
        try:
            header = next(reader, None)
            if header is None:
                return
            consumed.clear()
            last_line = reader.line_num
            for cells in reader:
                first_line, last_line = last_line + 1, reader.line_num
                raw = "".join(consumed).rstrip("\r\n")
                consumed.clear()
                if not "".join(cells).strip() and len(cells) <= 1:
                    continue  # a blank line
                yield _csv_row(first_line, header, cells, raw)
        except csv.Error as error:
            raise ValueError(
                f"cannot parse CSV file {path} near line {reader.line_num} ({error}); fix its "
                "quoting or save it as JSONL"
            ) from error


def _read_parquet(path: Path) -> Iterator[_Parsed | _Failure]:
    """Records of a Parquet file, read in batches of PARQUET_BATCH_ROWS."""
    import pyarrow
    import pyarrow.parquet

    if path.stat().st_size == 0:
        return
    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowInvalid as error:
        raise ValueError(f"{path} is not a readable Parquet file ({error}).") from error
    index = 0
    for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            index += 1
            yield _Parsed(index, record)


def _read_hf_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict,
) -> Iterator[_Parsed | _Failure]:
    """Records of a Dataset, or of each split of a DatasetDict in order (split set by name)."""
    groups = dataset.items() if hasattr(dataset, "items") else [(None, dataset)]
    index = 0
    for split_name, split_dataset in groups:
        split = canonical_split_name(split_name)
        if split_name is not None and split is None:
            logger.warning("split %r is neither train nor eval; its rows get no split", split_name)
        for record in split_dataset:
            index += 1
            yield _Parsed(index, record, split=split)


def _read_saved_dataset(path: Path) -> Iterator[_Parsed | _Failure]:
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


def _read_hub_dataset(dataset_id: str) -> Iterator[_Parsed | _Failure]:
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
    "csv": _read_csv,
}


def _records_of(source: str) -> Iterator[_Parsed | _Failure]:
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
        return _FORMAT_READERS[format_name](path)
    if format_name is None and _HUB_ID.match(source):
        return _read_hub_dataset(source)
    raise FileNotFoundError(
        f"data file {source!r} does not exist (relative to {os.getcwd()}); check the path"
    )


def _canonical_row(parsed: _Parsed, kind: str) -> dict[str, Any]:
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


def read_records(paths: Sequence[str | Path] | str | Path, kind: str) -> ReadResult:
    """Read data files (or saved datasets, or hub ids) as canonical rows of `kind`.

    Returns the rows (``frame``: the kind's fields with None where absent, ``split``,
    ``source_file`` as given and 1-based ``source_line``: the physical line for JSONL and CSV,
    whose header is line 1, the record's position for JSON, Parquet and datasets) and the
    records that could not be read (``rejected``: ``source_file``, ``source_line``, ``reason``,
    ``detail``, ``raw``). Raises FileNotFoundError for a missing path and ValueError for an
    unknown kind or file extension, or a hub id while hub access is off.
    """
    check_kind(kind)
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for path in paths:
        source_file = str(path)
        rows_before, rejected_before = len(rows), len(rejected)
        for item in _records_of(source_file):
            provenance = {"source_file": source_file, "source_line": item.line}
            if isinstance(item, _Failure):
                rejected.append(
                    {**provenance, "reason": item.reason, "detail": item.detail, "raw": item.raw}
                )
                continue
            try:
                rows.append({**_canonical_row(item, kind), **provenance})
            except AdapterError as error:
                rejected.append(
                    {
                        **provenance,
                        "reason": error.reason,
                        "detail": error.detail,
                        "raw": item.shown(),
                    }
                )
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
