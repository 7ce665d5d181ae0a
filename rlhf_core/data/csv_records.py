"""Records of a CSV file: a header row, then one record per row, read line by line with each
row bounded (`max_row_bytes`), so a huge or unterminated cell is one rejected row."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf_core.data.raw_records import (
    READ_BLOCK,
    FailedRecord,
    OversizedRecord,
    ParsedRecord,
    ReadLimits,
    failed_record,
    read_through,
    text_bytes,
)

CSV_JSON_FIELDS = ("prompt", "responses", "messages", "completions", "ranking", "meta")
# Invalid UTF-8 bytes, as `errors="surrogateescape"` keeps them in decoded text.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Long responses can exceed the csv module's default cell limit of 128 KiB.
CSV_MAX_CELL_CHARS = 2**31 - 1


def _csv_cell(field: str, cell: str) -> Any:
    """A CSV cell as a value: None if empty, decoded JSON for list/dict fields, float margin."""
    if cell == "":
        return None
    if field in CSV_JSON_FIELDS and cell.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(cell)
        except (ValueError, RecursionError):  # ValueError: malformed, or a 5000-digit integer
            return cell  # kept as text: validation rejects it with the field's reason
        return decoded if isinstance(decoded, list | dict) else cell
    if field == "margin":
        try:
            return float(cell)
        except ValueError:
            return cell
    return cell


def _csv_row(
    line: int, header: list[str], cells: list[str], raw: str
) -> ParsedRecord | FailedRecord:
    """One CSV data row as a record, or the reason it cannot be one."""
    if _ESCAPED_BYTE.search(raw):
        return failed_record(line, "invalid_utf8", "the row is not valid UTF-8", text_bytes(raw))
    if len(cells) > len(header):
        detail = f"the row has {len(cells)} cells but the header names {len(header)} columns"
        return failed_record(line, "unrecognised_shape", detail, raw)
    record = {field: _csv_cell(field, cell) for field, cell in zip(header, cells, strict=False)}
    return ParsedRecord(line, record, raw_text=raw)


class _RowTooLarge(Exception):
    def __init__(self, oversized: OversizedRecord) -> None:
        super().__init__("a CSV row over the row limit")
        self.oversized = oversized


class _CsvLines:
    """Physical lines for csv.reader, keeping those of the row being read.

    A row that grows past `max_bytes` raises _RowTooLarge once the rest of its physical line
    has been read through (digested, not kept), so no row is ever held whole; the csv reader
    starts afresh on its next call.
    """

    def __init__(self, handle: Any, max_bytes: int) -> None:
        self.handle = handle
        self.max_bytes = max_bytes
        self.consumed: list[str] = []
        self.size = 0  # characters of the row so far (each at least one byte)
        self.count = 0  # physical lines read

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline(self.max_bytes - self.size + 1)
        if not line:
            raise StopIteration
        self.consumed.append(line)
        self.size += len(line)
        if self.size > self.max_bytes:
            first = "".join(self.consumed)
            self.take()
            self.count += 1
            raise _RowTooLarge(read_through(first, lambda: self.handle.readline(READ_BLOCK)))
        self.count += 1
        return line

    def take(self) -> str:
        """The text of the row just read, forgetting it."""
        raw = "".join(self.consumed)
        self.consumed.clear()
        self.size = 0
        return raw


def read_csv(path: Path, limits: ReadLimits) -> Iterator[ParsedRecord | FailedRecord]:
    """Records of a CSV file with a header; a row's line is the physical line it starts on."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        lines = _CsvLines(handle, limits.row_bytes)
        csv.field_size_limit(max(csv.field_size_limit(), CSV_MAX_CELL_CHARS))
        reader = csv.reader(lines)
        try:
            try:
                header = next(reader, None)
            except _RowTooLarge as error:
                raise ValueError(
                    f"the header of CSV file {path} is longer than the row limit "
                    f"({limits.row_bytes} bytes, data.validation.max_row_mb); is it a CSV file?"
                ) from error
            if header is None:
                return
            if _ESCAPED_BYTE.search("".join(header)):
                raise ValueError(
                    f"the header (first line) of CSV file {path} is not valid UTF-8, so the file "
                    "is not a UTF-8 CSV file: save it as UTF-8, or set it aside"
                )
            lines.take()
            last_line = lines.count
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except _RowTooLarge as error:
                    yield error.oversized.failure(last_line + 1, limits.row_bytes)
                    last_line = lines.count
                    continue
                first_line, last_line = last_line + 1, lines.count
                raw = lines.take().rstrip("\r\n")
                if not "".join(cells).strip() and len(cells) <= 1:
                    continue  # a blank line
                yield _csv_row(first_line, header, cells, raw)
        except csv.Error as error:
            raise ValueError(
                f"cannot parse CSV file {path} near line {lines.count} ({error}); fix its "
                "quoting or save it as JSONL"
            ) from error
