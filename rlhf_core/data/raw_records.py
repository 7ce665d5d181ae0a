"""The units the format readers yield, bounded whatever the input: a record that parsed
(`ParsedRecord`) or one that did not (`FailedRecord`: a prefix of its text with the sha256 and
size of all of it), and the reading of lines that may be poison (`bounded_lines`: a line over
the row limit is digested block by block, never held whole)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rlhf_core.data.schemas import canonical_json

REJECTED_COLUMNS = ("source_file", "source_line", "reason", "detail", "raw", "raw_sha256")
REJECTED_COLUMNS += ("raw_bytes",)
MAX_RAW_CHARS = 2000
# Limits when the caller gives none; `ValidationSettings.max_file_mb`/`max_row_mb` set them.
DEFAULT_MAX_FILE_BYTES = 1024 * 2**20
DEFAULT_MAX_ROW_BYTES = 16 * 2**20
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ReadLimits:
    """The most bytes one file, and one record of it, may hold."""

    file_bytes: int = DEFAULT_MAX_FILE_BYTES
    row_bytes: int = DEFAULT_MAX_ROW_BYTES


@dataclass(frozen=True)
class ParsedRecord:
    """A record a format reader could parse (not yet known to be an object)."""

    line: int
    value: Any
    raw_text: str | None = None  # the record's own text where the format has one
    split: str | None = None  # the split its container (JSON key, DatasetDict) implies

    def shown(self) -> str:
        """The record's whole text, for a rejection (which keeps a prefix and its hash)."""
        if self.raw_text is not None:
            return self.raw_text
        return value_text(self.value)


@dataclass(frozen=True)
class FailedRecord:
    """A record a format reader could not parse: a prefix of its text, the hash and size of
    the whole of it."""

    line: int
    reason: str
    detail: str
    raw: str
    raw_sha256: str
    raw_bytes: int


def value_text(value: Any) -> str:
    """The canonical JSON text of a parsed value (its repr where JSON cannot hold it)."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def raw_digest(raw: str | bytes) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a record's text; lone surrogates are kept as their
    UTF-8-style bytes, so every text has a digest."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(data).hexdigest(), len(data)


def failed_record(line: int, reason: str, detail: str, raw: str | bytes) -> FailedRecord:
    """A rejection keeping MAX_RAW_CHARS characters of `raw` and the digest of all of it."""
    sha256, size = raw_digest(raw)
    shown = bytes_as_text(raw[: MAX_RAW_CHARS * 4]) if isinstance(raw, bytes) else raw
    return FailedRecord(line, reason, detail, shown[:MAX_RAW_CHARS], sha256, size)


@dataclass(frozen=True)
class OversizedRecord:
    """A record longer than the row limit: its first bytes and the digest of all of it."""

    prefix: bytes
    sha256: str
    size: int

    def failure(self, line: int, limit: int) -> FailedRecord:
        detail = (
            f"the record is {self.size} bytes, more than the {limit}-byte limit on one record "
            "(data.validation.max_row_mb); raise it if such records are real"
        )
        shown = bytes_as_text(self.prefix)[:MAX_RAW_CHARS]
        return FailedRecord(line, "row_too_large", detail, shown, self.sha256, self.size)


def read_through(first: bytes | str, rest: Any) -> OversizedRecord:
    """Digest a long line from `first` to its newline, reading `rest()` block by block."""
    as_bytes = (lambda part: part) if isinstance(first, bytes) else text_bytes
    data = as_bytes(first)
    digest, size, prefix = hashlib.sha256(data), len(data), data[: MAX_RAW_CHARS * 4]
    part = first
    while part and not part.endswith(b"\n" if isinstance(part, bytes) else "\n"):
        part = rest()
        data = as_bytes(part)
        digest.update(data)
        size += len(data)
    return OversizedRecord(prefix, digest.hexdigest(), size)


def text_bytes(text: str) -> bytes:
    """Bytes of text decoded with surrogateescape (invalid bytes come back as they were)."""
    return text.encode("utf-8", errors="surrogateescape")


def bounded_lines(
    handle: BinaryIO, limits: ReadLimits, path: Path
) -> Iterator[bytes | OversizedRecord]:
    """Physical lines of a binary file; a line over the row limit is read through, never held.

    Raises ValueError once more than the file limit has been read (a .gz that inflates past
    it, or a file that grew while it was read).
    """
    total = 0
    while line := handle.readline(limits.row_bytes + 1):
        if len(line) > limits.row_bytes and not line.endswith(b"\n"):
            oversized = read_through(line, lambda: handle.readline(READ_BLOCK))
            total += oversized.size
            item: bytes | OversizedRecord = oversized
        else:
            total += len(line)
            item = line
        if total > limits.file_bytes:
            raise ValueError(
                f"{path} holds more than {limits.file_bytes} bytes once read (decompressed), "
                "the limit on one data file (data.validation.max_file_mb); split it or raise "
                "the limit"
            )
        yield item


# json.loads recurses once per level of nesting; a value deeper than the interpreter's stack
# (a poison row, or a hostile one) raised RecursionError and lost the whole file.
TOO_DEEP = "the value nests lists or objects deeper than a JSON reader can follow"


def bytes_as_text(data: bytes) -> str:
    """Text of possibly invalid UTF-8 bytes, invalid bytes shown as escapes like \\xff."""
    return data.decode("utf-8", errors="backslashreplace")


def load_json_record(text: str, line: int, what: str) -> Any:
    """json.loads of a record's text, or the FailedRecord that says why it cannot be read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"column {error.colno}" if what == "line" else f"line {error.lineno}"
        detail = f"the {what} is not valid JSON ({error.msg} at {where})"
        return failed_record(
            error.lineno if what == "file" else line, "malformed_json", detail, text
        )
    except RecursionError:
        return failed_record(line, "too_deeply_nested", TOO_DEEP, text)
    except ValueError as error:  # e.g. an integer longer than Python converts (4300 digits)
        return failed_record(
            line, "malformed_json", f"the {what} holds a value JSON cannot read ({error})", text
        )
