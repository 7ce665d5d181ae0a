"""Plain texts out of canonical rows, e.g. to train a tokenizer on a data set."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

TEXT_FIELDS = ("completion", "chosen", "rejected")


def row_texts(row: Mapping[str, Any]) -> Iterator[str]:
    """Every string of a canonical row: prompt message contents, then the responses.

    Values of the wrong type are skipped, so this is safe on unvalidated rows.
    """
    prompt = row.get("prompt")
    if isinstance(prompt, list | tuple):
        for message in prompt:
            if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                yield message["content"]
    for field in TEXT_FIELDS:
        if isinstance(row.get(field), str):
            yield row[field]
    responses = row.get("responses")
    if isinstance(responses, list | tuple):
        yield from (text for text in responses if isinstance(text, str))


def corpus_from_rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Texts of many rows, in order."""
    for row in rows:
        yield from row_texts(row)
