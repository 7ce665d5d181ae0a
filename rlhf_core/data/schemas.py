"""The canonical data schemas: one row is one example, whatever file format it came from.

A *message* is ``{"role": "system" | "user" | "assistant", "content": str}``. A canonical
``prompt`` is always a list of messages: a plain-string prompt ``s`` becomes
``[{"role": "user", "content": s}]``, and a prompt list ends with a user turn, possibly preceded
by system/user/assistant history. Responses are plain strings (the final assistant reply's
content).

Kinds and their fields (required first, then optional):

============  ==========================================  ======================================
kind          required                                    optional
============  ==========================================  ======================================
sft           ``prompt`` (messages, may be ``[]`` for      --
              plain completion data), ``completion`` (str)
preference    ``prompt``, ``chosen`` (str),                ``margin`` (float), ``source`` (str),
              ``rejected`` (str)                           ``annotator`` (str),
                                                           ``created_at`` (ISO-8601 str)
ranked        ``prompt``, ``responses`` (list[str], at     --
              least 2, preferred first)
prompts       ``prompt``                                   ``meta`` (dict or str, free-form;
                                                           ignored by validation)
============  ==========================================  ======================================

Every kind may also carry ``split`` (``"train"`` or ``"eval"``) when the input says which split
a row belongs to. ``split`` and the provenance columns the readers add (``source_file``,
``source_line``) are *not* content: they are left out of :func:`content_hash`, so the same
example read from two files, or listed under another split, hashes the same.

Example rows (JSON)::

    {"prompt": [{"role": "user", "content": "Say hi."}], "completion": "Hi!"}
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "Lyon.", "margin": 1.5, "annotator": "a7"}
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "responses": ["Blue.", "A colour.", "No."]}
    {"prompt": [{"role": "user", "content": "Write a haiku."}], "meta": {"topic": "poems"}}

Other common formats (TRL standard and conversational, implicit prompts, ``messages``, Anthropic
HH-RLHF transcripts, ``completions`` + ``ranking``) are converted to these by
``rlhf_core.data.adapters``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

KINDS = ("sft", "preference", "ranked", "prompts")

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "prompts": ("prompt",),
}

# Optional *content* fields; `split` is optional in every kind but is not content (see SPLIT_FIELD).
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": (),
    "preference": ("margin", "source", "annotator", "created_at"),
    "ranked": (),
    "prompts": ("meta",),
}

SPLIT_FIELD = "split"
SPLITS = ("train", "eval")
PROVENANCE_FIELDS = ("source_file", "source_line")
ROLES = ("system", "user", "assistant")

# Names that inputs use for a split (a DatasetDict's split names, JSON top-level keys, a
# record's own `split` value) mapped to the canonical split.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "eval": "eval",
    "evaluation": "eval",
    "validation": "eval",
    "valid": "eval",
    "val": "eval",
    "dev": "eval",
    "test": "eval",
}


class Message(TypedDict):
    """One chat turn of a canonical prompt."""

    role: Literal["system", "user", "assistant"]
    content: str


def check_kind(kind: str) -> str:
    """Return `kind` if it is one of :data:`KINDS`, else raise a ValueError naming the choices."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def schema_fields(kind: str) -> tuple[str, ...]:
    """The content fields of `kind`: its required fields, then its optional ones."""
    return REQUIRED_FIELDS[check_kind(kind)] + OPTIONAL_FIELDS[kind]


def canonical_split_name(name: Any) -> str | None:
    """Map a split name such as ``"validation"`` or ``"test_prefs"`` to ``"train"``/``"eval"``.

    The name's first word (split on ``_``, ``-`` or ``.``) is looked up in
    :data:`SPLIT_ALIASES`, case-insensitively; an unrecognised name gives None.
    """
    if not isinstance(name, str):
        return None
    lowered = name.strip().lower()
    if lowered in SPLIT_ALIASES:
        return SPLIT_ALIASES[lowered]
    first_word = lowered.replace("-", "_").replace(".", "_").split("_", 1)[0]
    return SPLIT_ALIASES.get(first_word)


def _plain_json_value(value: Any) -> Any:
    """`json.dumps` fallback for values that pandas/numpy/pyarrow hand back."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "isoformat"):  # datetime, date, pandas Timestamp
        return value.isoformat()
    raise TypeError(f"cannot encode a {type(value).__name__} as JSON")


def canonical_json(obj: Any) -> str:
    """JSON text of `obj` with sorted keys, no whitespace and unescaped non-ASCII characters.

    Equal data gives equal text whatever the key order, so the text can be hashed.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain_json_value
    )


def _missing_to_none(value: Any) -> Any:
    """A float NaN (pandas' filler for a missing value) counts as missing, like None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def content_hash(row: Mapping[str, Any], kind: str) -> str:
    """Hex sha256 of the canonical JSON of the row's content fields for `kind`.

    Only :func:`schema_fields` of `kind` enter the hash (an absent field counts as None);
    ``split``, provenance and unknown columns do not, nor does the key order.
    """
    content = {field: _missing_to_none(row.get(field)) for field in schema_fields(kind)}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def as_prompt_messages(prompt: Any) -> Any:
    """A canonical prompt: a string becomes one user message, a list of messages is copied.

    Any other value (None, a number) is returned unchanged, so that it still has a key.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) or hasattr(prompt, "tolist"):  # list, tuple, numpy array
        return [dict(message) if isinstance(message, Mapping) else message for message in prompt]
    return prompt


def prompt_key(prompt_messages: str | Sequence[Mapping[str, Any]]) -> str:
    """Hex sha256 of the canonical JSON of a prompt (a string counts as one user message).

    Two rows share a prompt exactly when their prompt keys are equal.
    """
    messages = as_prompt_messages(prompt_messages)
    return hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()
