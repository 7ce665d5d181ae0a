"""Row checks for canonical data: derived columns computed with pandas, checked by a GX suite.

Pandas has no row-level expectation for "chosen differs from rejected" or "no control
character in any message", so every check is first computed into a small derived column (a
bool, a length or a count) and then checked by one Great Expectations expectation whose
``meta["reason_code"]`` names the quarantine reason it stands for. A derived value is None where
its check does not apply to the row (the response count of a row whose ``responses`` is not a
list, say); GX skips nulls, so such a row fails only the checks that do apply (``wrong_type``).

Which texts a row has: the content of every prompt message, plus its *responses*: ``completion``
(sft), ``chosen`` and ``rejected`` (preference), each of ``responses`` (ranked); a ``prompts``
row has no responses. Character lengths are measured on each text separately. Token counts
(only with a tokenizer, only for rows whose texts are well-typed, valid and within
``max_chars``, since tokenizing megabyte strings is slow and such rows are quarantined anyway)
count each text without special tokens or chat template: a row's *sequence length* is the
prompt's tokens (summed over its messages) plus its longest response's tokens, and its *shortest
text* is its shortest response (the prompt, for ``prompts`` rows).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.adapters import shown_value
from rlhf_core.data.schemas import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    ROLES,
    SPLIT_FIELD,
    SPLITS,
    content_hash,
    prompt_key,
)

# Primary reason = the first failing code in this order.
REASON_PRIORITY = (
    "missing_field",
    "wrong_type",
    "invalid_margin",
    "invalid_text",
    "empty_text",
    "too_long_chars",
    "too_long_tokens",
    "too_short_tokens",
    "invalid_role",
    "chosen_equals_rejected",
    "too_few_responses",
    "duplicate_response",
    "duplicate_row",
    "prompt_in_train_and_eval",
)

ROW_NUMBER = "row_number"  # positional id GX reports failing rows by

# C0/C1 control characters except \t \n \r, and lone UTF-16 surrogates (from "\ud800" escapes).
_INVALID_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_STRING_FIELDS = ("completion", "chosen", "rejected", "source", "annotator", "created_at")
_RESPONSE_FIELDS = {"sft": ("completion",), "preference": ("chosen", "rejected")}


@dataclass
class RowFindings:
    """What the pandas side found in one row: derived column values and failure sentences."""

    values: dict[str, Any] = field(default_factory=dict)  # derived column -> value or None
    # reason code -> the sentence to report if GX flags the row for that code
    notes: dict[str, str] = field(default_factory=dict)
    prompt_texts: list[tuple[str, str]] = field(default_factory=list)  # (label, content)
    response_texts: list[tuple[str, str]] = field(default_factory=list)  # (label, text)
    tokenizable: bool = False  # every text well-typed, valid and within max_chars


def plain(value: Any) -> Any:
    """Plain Python lists/dicts for numpy arrays (Parquet hands list columns back as arrays)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    return value


def is_missing(value: Any) -> bool:
    """True for None, NaN, pd.NA and NaT: what pandas (and GX) count as null."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _describe_character(text: str) -> str:
    match = _INVALID_CHARACTER.search(text)
    assert match is not None
    code_point = ord(match.group())
    kind = "lone surrogate" if 0xD800 <= code_point <= 0xDFFF else "control character"
    return f"{kind} U+{code_point:04X} at position {match.start()}"


def _first_and_count(problems: Sequence[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def _is_well_formed(message: Any) -> bool:
    """A message is a dict with a string role and a string content."""
    return (
        isinstance(message, Mapping)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def _well_formed_messages(prompt: Any, type_problems: list[str]) -> list[dict] | None:
    """The prompt's well-formed messages, noting type problems; None if it is not a list."""
    if not isinstance(prompt, list):
        type_problems.append(
            f"'prompt' should be a list of {{role, content}} messages, got {_type_name(prompt)}"
        )
        return None
    type_problems.extend(
        f"prompt message {number} should be a dict with string role and content"
        for number, message in enumerate(prompt, start=1)
        if not _is_well_formed(message)
    )
    return [message for message in prompt if _is_well_formed(message)]


def _check_types(
    row: Mapping[str, Any], prompt: Any, kind: str, findings: RowFindings
) -> list[dict] | None:
    """Fill `has_expected_types` and the row's texts; return the well-formed prompt messages."""
    problems: list[str] = []
    messages = None if is_missing(prompt) else _well_formed_messages(prompt, problems)
    if messages is not None:
        findings.prompt_texts = [
            (f"prompt message {number}", message["content"])
            for number, message in enumerate(prompt, start=1)
            if _is_well_formed(message)
        ]
    for name in _STRING_FIELDS:
        value = row.get(name)
        if name in REQUIRED_FIELDS[kind] + OPTIONAL_FIELDS[kind] and not is_missing(value):
            if isinstance(value, str):
                if name in _RESPONSE_FIELDS.get(kind, ()):
                    findings.response_texts.append((f"'{name}'", value))
            else:
                problems.append(f"'{name}' should be a string, got {_type_name(value)}")
    if kind == "ranked" and not is_missing(row.get("responses")):
        responses = plain(row.get("responses"))
        if isinstance(responses, list):
            for number, text in enumerate(responses, start=1):
                if isinstance(text, str):
                    findings.response_texts.append((f"response {number}", text))
                else:
                    problems.append(f"response {number} should be a string, got {_type_name(text)}")
        else:
            problems.append(f"'responses' should be a list of strings, got {_type_name(responses)}")
    split = row.get(SPLIT_FIELD)
    if not is_missing(split) and split not in SPLITS:
        problems.append(f"'split' should be one of {', '.join(SPLITS)}, got {shown_value(split)}")
    findings.values["has_expected_types"] = not problems
    if problems:
        findings.notes["wrong_type"] = _first_and_count(problems)
    return messages


def _check_margin(row: Mapping[str, Any], findings: RowFindings) -> None:
    margin = row.get("margin")
    valid = is_missing(margin) or (
        isinstance(margin, numbers.Real)
        and not isinstance(margin, bool | np.bool_)
        and math.isfinite(margin)
    )
    findings.values["margin_is_valid"] = valid
    if not valid:
        findings.notes["invalid_margin"] = (
            f"'margin' should be a finite number or null, got {shown_value(margin)}"
        )


def _check_texts(
    kind: str, prompt: Any, findings: RowFindings, settings: ValidationSettings
) -> None:
    """Fill `text_is_valid`, `text_is_nonempty` and `longest_text_chars`."""
    texts = findings.prompt_texts + findings.response_texts
    invalid = [
        f"{label} contains {_describe_character(text)}"
        for label, text in texts
        if _INVALID_CHARACTER.search(text)
    ]
    empty = [f"{label} is empty or whitespace only" for label, text in texts if not text.strip()]
    if kind != "sft" and isinstance(prompt, list) and not prompt:
        empty.insert(0, "the prompt has no messages")
    findings.values["text_is_valid"] = not invalid
    findings.values["text_is_nonempty"] = not empty
    if invalid:
        findings.notes["invalid_text"] = _first_and_count(invalid)
    if empty:
        findings.notes["empty_text"] = _first_and_count(empty)
    longest = max(texts, key=lambda item: len(item[1]), default=None)
    findings.values["longest_text_chars"] = None if longest is None else len(longest[1])
    if longest is not None:
        findings.notes["too_long_chars"] = (
            f"{longest[0]} has {len(longest[1])} characters, more than max_chars="
            f"{settings.max_chars}"
        )


def _check_roles(prompt: Any, messages: list[dict] | None, findings: RowFindings) -> None:
    if messages is None:
        findings.values["roles_are_valid"] = None
        return
    problems = [
        f"prompt message {n} has role {shown_value(m['role'])}, not one of {', '.join(ROLES)}"
        for n, m in enumerate(prompt, start=1)
        if _is_well_formed(m) and m["role"] not in ROLES
    ]
    # An unknown or malformed last message is reported above, not again here.
    last = messages[-1] if messages and len(messages) == len(prompt) else None
    if last is not None and last["role"] in ROLES and last["role"] != "user":
        problems.append(
            f"the prompt's last message has role {shown_value(last['role'])}; a prompt must end "
            "with a user turn"
        )
    findings.values["roles_are_valid"] = not problems
    if problems:
        findings.notes["invalid_role"] = _first_and_count(problems)


def _check_pair(row: Mapping[str, Any], findings: RowFindings) -> None:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        findings.values.update(
            chosen_differs_from_rejected=None, chosen_is_longer=None, chosen_is_shorter=None
        )
        return
    differs = chosen.strip() != rejected.strip()
    findings.values["chosen_differs_from_rejected"] = differs
    findings.values["chosen_is_longer"] = float(len(chosen) > len(rejected))
    findings.values["chosen_is_shorter"] = float(len(chosen) < len(rejected))
    if not differs:
        findings.notes["chosen_equals_rejected"] = (
            "'chosen' and 'rejected' are the same text once surrounding whitespace is stripped"
        )


def _check_ranking(row: Mapping[str, Any], findings: RowFindings) -> None:
    responses = plain(row.get("responses"))
    if not isinstance(responses, list):
        findings.values.update(response_count=None, responses_are_distinct=None)
        return
    findings.values["response_count"] = len(responses)
    findings.notes["too_few_responses"] = (
        f"a ranking needs at least 2 responses, the row has {len(responses)}"
    )
    first_seen: dict[str, int] = {}
    repeats = []
    for number, text in enumerate(responses, start=1):
        if not isinstance(text, str):
            continue
        key = text.strip()
        if key in first_seen:
            repeats.append(f"response {number} repeats response {first_seen[key]}")
        else:
            first_seen[key] = number
    findings.values["responses_are_distinct"] = not repeats
    if repeats:
        findings.notes["duplicate_response"] = _first_and_count(repeats)


def inspect_row(row: Mapping[str, Any], kind: str, settings: ValidationSettings) -> RowFindings:
    """Derived check values and failure sentences for one row of `kind` (never raises)."""
    findings = RowFindings()
    missing = [name for name in REQUIRED_FIELDS[kind] if is_missing(row.get(name))]
    if missing:
        findings.notes["missing_field"] = (
            f"required field {', '.join(map(repr, missing))} is missing or null"
        )
    prompt = plain(row.get("prompt"))
    messages = _check_types(row, prompt, kind, findings)
    if kind == "preference":
        _check_margin(row, findings)
        _check_pair(row, findings)
    _check_texts(kind, prompt, findings, settings)
    _check_roles(prompt, messages, findings)
    if kind == "ranked":
        _check_ranking(row, findings)
    longest = findings.values["longest_text_chars"]
    findings.tokenizable = (
        findings.values["has_expected_types"]
        and findings.values["text_is_valid"]
        and longest is not None
        and longest <= settings.max_chars
    )
    return findings


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts of `texts`, without special tokens.

    `tokenizer` is a transformers tokenizer (called on the batch) or a `tokenizers.Tokenizer`
    (its `encode_batch`).
    """
    if not texts:
        return []
    if hasattr(tokenizer, "encode_batch"):
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]
    if callable(tokenizer):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    raise ValueError(
        f"tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, "
        f"got {_type_name(tokenizer)}"
    )


def add_token_counts(
    findings: list[RowFindings], kind: str, tokenizer: Any, settings: ValidationSettings
) -> None:
    """Fill `longest_sequence_tokens` and `shortest_text_tokens` (None where not tokenizable)."""
    texts: list[str] = []
    for row in findings:
        if row.tokenizable:
            texts.extend(text for _, text in row.prompt_texts)
            texts.extend(text for _, text in row.response_texts)
    counts = iter(count_tokens(tokenizer, texts))
    for row in findings:
        row.values["longest_sequence_tokens"] = row.values["shortest_text_tokens"] = None
        if not row.tokenizable:
            continue
        prompt_tokens = sum(next(counts) for _ in row.prompt_texts)
        responses = [(label, next(counts)) for label, _ in row.response_texts]
        if kind == "prompts" or not responses:
            longest, shortest = prompt_tokens, ("the prompt", prompt_tokens)
        else:
            longest = prompt_tokens + max(tokens for _, tokens in responses)
            shortest = min(responses, key=lambda item: item[1])
        row.values["longest_sequence_tokens"] = longest
        row.values["shortest_text_tokens"] = shortest[1]
        row.notes["too_long_tokens"] = (
            f"the prompt plus its longest response is {longest} tokens, more than max_tokens="
            f"{settings.max_tokens}"
        )
        row.notes["too_short_tokens"] = (
            f"{shortest[0]} has {shortest[1]} tokens, fewer than min_tokens={settings.min_tokens}"
        )


def _safe_hash(row: Mapping[str, Any], kind: str) -> str | None:
    try:
        return content_hash({name: plain(value) for name, value in row.items()}, kind)
    except (TypeError, ValueError):  # unserialisable values or lone surrogates
        return None


def _safe_prompt_key(prompt: Any) -> str | None:
    try:
        return prompt_key(prompt)
    except (TypeError, ValueError):
        return None


def _row_label(row: Mapping[str, Any], position: int) -> str:
    """Where a row came from: its file and line when the readers recorded them."""
    line = row.get("source_line")
    if isinstance(row.get("source_file"), str) and not is_missing(line):
        return f"{row['source_file']} line {line}"
    return f"row {position} (0-based)"


def add_duplicate_flags(
    rows: list[Mapping[str, Any]], kind: str, findings: list[RowFindings]
) -> None:
    """Fill `is_first_occurrence`: False for a row whose content hash an earlier row has."""
    first_position: dict[str, int] = {}
    for position, (row, found) in enumerate(zip(rows, findings, strict=True)):
        digest = _safe_hash(row, kind)
        if digest is None:
            found.values["is_first_occurrence"] = None
        elif (first := first_position.get(digest)) is not None:
            found.values["is_first_occurrence"] = False
            found.notes["duplicate_row"] = (
                f"the row repeats the content of {_row_label(rows[first], first)}, which is kept"
            )
        else:
            found.values["is_first_occurrence"] = True
            first_position[digest] = position


def add_split_leak_flags(rows: list[Mapping[str, Any]], findings: list[RowFindings]) -> None:
    """Fill `prompt_not_in_train_split` for eval rows (None for other rows)."""
    keys = [
        _safe_prompt_key(plain(row.get("prompt"))) if found.values["has_expected_types"] else None
        for row, found in zip(rows, findings, strict=True)
    ]
    train_keys = {
        key for row, key in zip(rows, keys, strict=True) if row.get(SPLIT_FIELD) == "train"
    }
    for row, key, found in zip(rows, keys, findings, strict=True):
        is_eval = row.get(SPLIT_FIELD) == "eval" and key is not None
        found.values["prompt_not_in_train_split"] = (key not in train_keys) if is_eval else None
        if is_eval and key in train_keys:
            found.notes["prompt_in_train_and_eval"] = (
                "this eval row's prompt also appears in the train split"
            )
