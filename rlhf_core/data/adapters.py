"""Convert one input record of a common format into a canonical row (see ``schemas``).

Each adapter is a pure function from a record dict to a canonical dict of the kind's fields.
A record whose shape is recognised but cannot be converted raises :class:`AdapterError`; the
reader turns that into a rejected row. Field *values* are not checked here (a numeric
``chosen`` stays numeric, an empty string stays empty): that is validation's job.

Recognised inputs, per kind:

- every kind: canonical records (a plain-string ``prompt`` becomes one user message);
- ``preference``: TRL standard (``prompt``/``chosen``/``rejected`` strings), TRL conversational
  (``prompt`` messages, ``chosen``/``rejected`` each a list holding one assistant message), TRL
  implicit prompt (``chosen``/``rejected`` full conversations, no ``prompt``), and Anthropic
  HH-RLHF (``chosen``/``rejected`` full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts);
- ``sft``: TRL ``prompt``/``completion`` (strings or conversational), ``text`` alone (a
  completion with an empty prompt), and ``messages`` (a conversation ending in an assistant
  turn);
- ``ranked``: ``responses`` (strings or single assistant messages, preferred first), or
  ``completions`` with ``ranking`` (indices into ``completions``, best first);
- ``prompts``: ``prompt`` with optional ``meta``; without ``prompt``, the prompt of any
  preference or sft shape above (e.g. an HH-RLHF pair or a ``messages`` conversation).

Optional fields of the kind (``margin``, ``source``, ``annotator``, ``created_at``, ``meta``)
and ``split`` are passed through (a split name such as ``"validation"`` becomes ``"eval"``; a
datetime ``created_at`` becomes its ISO-8601 text). Unknown extra fields are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from rlhf_core.data.schemas import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    SPLIT_FIELD,
    as_prompt_messages,
    canonical_split_name,
    check_kind,
)

Record = Mapping[str, Any]

# HH-RLHF turn markers; the first turn may lack the leading blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class AdapterError(ValueError):
    """A record whose shape cannot be converted; `reason` is a snake_case rejection code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def shown_value(value: Any, limit: int = 60) -> str:
    """A record's value as a short repr for a rejection sentence.

    Values come from untrusted files: a megabyte string would make a megabyte sentence, and
    repr() of an integer over 4300 digits raises ValueError, so both are cut down.
    """
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_missing(record: Record, field: str) -> bool:
    return record.get(field) is None


def _is_message(value: Any) -> bool:
    return isinstance(value, Mapping) and "role" in value


def _is_conversation(value: Any) -> bool:
    """A non-empty list whose items all look like chat messages."""
    return isinstance(value, list | tuple) and len(value) > 0 and all(map(_is_message, value))


def _message(value: Mapping[str, Any]) -> dict[str, Any]:
    """A message reduced to its canonical keys (extra keys such as `name` are dropped)."""
    return {key: value[key] for key in ("role", "content") if key in value}


def normalise_prompt(prompt: Any) -> Any:
    """A canonical prompt from a string, a message list or a single message dict.

    Other values (None, numbers) are returned unchanged for validation to report.
    """
    if isinstance(prompt, str):
        return as_prompt_messages(prompt)
    if _is_message(prompt):
        return [_message(prompt)]
    if isinstance(prompt, list | tuple):
        return [_message(item) if _is_message(item) else item for item in prompt]
    return prompt


def assistant_reply(value: Any, field: str) -> Any:
    """The text of a response given as a string, one assistant message, or a list of one.

    A list of several messages, or one whose message is not the assistant's, raises
    ``AdapterError("unrecognised_shape", ...)``; other values are returned unchanged.
    """
    if _is_message(value):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    if len(value) != 1 or not _is_message(value[0]):
        raise AdapterError(
            "unrecognised_shape",
            f"{field!r} is a list of {len(value)} items; a conversational response must be a "
            "list holding exactly one assistant message",
        )
    message = value[0]
    if message.get("role") != "assistant":
        raise AdapterError(
            "unrecognised_shape",
            f"{field!r} holds a {shown_value(message.get('role'))} message; a response must be "
            "the assistant's",
        )
    return message.get("content")


def _split_final_assistant_turn(conversation: Any, field: str) -> tuple[list[Any], Any]:
    """(earlier turns, final assistant content) of a conversation ending in an assistant turn."""
    if not _is_conversation(conversation):
        raise AdapterError(
            "unrecognised_shape", f"{field!r} is not a non-empty list of chat messages"
        )
    final = conversation[-1]
    if final.get("role") != "assistant":
        raise AdapterError(
            "unrecognised_shape",
            f"the last turn of {field!r} is {shown_value(final.get('role'))}; it must be the "
            "assistant's reply",
        )
    return [_message(turn) for turn in conversation[:-1]], final.get("content")


def _first_difference(left: Any, right: Any) -> int:
    """Index of the first differing item of two sequences (the shorter length if none differs)."""
    for index, (left_item, right_item) in enumerate(zip(left, right, strict=False)):
        if left_item != right_item:
            return index
    return min(len(left), len(right))


def _hh_turns(transcript: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into messages, dropping the one space after each marker."""
    markers = list(_HH_TURN.finditer(transcript))
    if not markers:
        raise AdapterError(
            "unrecognised_shape", "an HH-RLHF pair has no 'Human:' turn before its final reply"
        )
    if transcript[: markers[0].start()].strip():
        raise AdapterError(
            "unrecognised_shape",
            "an HH-RLHF transcript must start with a 'Human:' or 'Assistant:' turn",
        )
    turns = []
    for position, marker in enumerate(markers):
        end = markers[position + 1].start() if position + 1 < len(markers) else len(transcript)
        text = transcript[marker.end() : end]
        turns.append(
            {"role": _HH_ROLES[marker.group(1)], "content": text[1:] if text[:1] == " " else text}
        )
    return turns


def _hh_prefix_and_reply(transcript: str) -> tuple[str, str]:
    """(text before the last assistant marker, final assistant text) of an HH transcript."""
    last_marker = transcript.rfind("\n\nAssistant:")
    if last_marker < 0 and transcript.startswith("Assistant:"):
        last_marker = 0
    if last_marker < 0:
        raise AdapterError(
            "unrecognised_shape", "an HH-RLHF transcript has no '\\n\\nAssistant:' turn"
        )
    reply = transcript[last_marker:].split("Assistant:", 1)[1]
    return transcript[:last_marker], reply[1:] if reply[:1] == " " else reply


def looks_like_hh(chosen: Any, rejected: Any) -> bool:
    """Whether a chosen/rejected pair are Anthropic HH-RLHF transcripts."""
    return all(
        isinstance(text, str) and "Human:" in text and "Assistant:" in text
        for text in (chosen, rejected)
    )


def adapt_hh_pair(chosen: str, rejected: str) -> dict[str, Any]:
    """Prompt, chosen and rejected from two Anthropic HH-RLHF transcripts.

    The shared prompt is every turn before the last "\\n\\nAssistant:" of each transcript; the
    two must be identical, else ``AdapterError("hh_prefix_mismatch", ...)``. An empty final
    assistant turn gives an empty response (validation quarantines it).
    """
    chosen_prefix, chosen_reply = _hh_prefix_and_reply(chosen)
    rejected_prefix, rejected_reply = _hh_prefix_and_reply(rejected)
    if chosen_prefix != rejected_prefix:
        at = _first_difference(chosen_prefix, rejected_prefix)
        turn = max(1, sum(m.start() <= at for m in _HH_TURN.finditer(chosen_prefix)))
        raise AdapterError(
            "hh_prefix_mismatch",
            f"the chosen and rejected dialogues differ before their last assistant turn, in turn "
            f"{turn} at character {at}: {chosen_prefix[at : at + 40]!r} vs "
            f"{rejected_prefix[at : at + 40]!r}",
        )
    return {"prompt": _hh_turns(chosen_prefix), "chosen": chosen_reply, "rejected": rejected_reply}


def adapt_implicit_prompt_pair(chosen: Any, rejected: Any) -> dict[str, Any]:
    """Prompt, chosen and rejected from two full conversations (TRL implicit-prompt format).

    The prompt is the turns before each final assistant turn, which must be identical.
    """
    chosen_history, chosen_reply = _split_final_assistant_turn(chosen, "chosen")
    rejected_history, rejected_reply = _split_final_assistant_turn(rejected, "rejected")
    if chosen_history != rejected_history:
        at = _first_difference(chosen_history, rejected_history)
        raise AdapterError(
            "unrecognised_shape",
            f"the chosen and rejected conversations differ before their final assistant turn, "
            f"from turn {at + 1}; an implicit prompt must be shared",
        )
    return {"prompt": chosen_history, "chosen": chosen_reply, "rejected": rejected_reply}


def _adapt_preference(record: Record) -> dict[str, Any]:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if _is_missing(record, "prompt"):
        if looks_like_hh(chosen, rejected):
            return adapt_hh_pair(chosen, rejected)
        if _is_conversation(chosen) and _is_conversation(rejected):
            return adapt_implicit_prompt_pair(chosen, rejected)
    return {
        "prompt": normalise_prompt(record.get("prompt")),
        "chosen": assistant_reply(chosen, "chosen"),
        "rejected": assistant_reply(rejected, "rejected"),
    }


def _adapt_sft(record: Record) -> dict[str, Any]:
    if _is_missing(record, "completion") and not _is_missing(record, "messages"):
        history, reply = _split_final_assistant_turn(record["messages"], "messages")
        return {"prompt": history, "completion": reply}
    no_prompt_or_completion = _is_missing(record, "completion") and _is_missing(record, "prompt")
    if no_prompt_or_completion and not _is_missing(record, "text"):
        return {"prompt": [], "completion": record["text"]}
    return {
        "prompt": normalise_prompt(record.get("prompt")),
        "completion": assistant_reply(record.get("completion"), "completion"),
    }


def _ranked_from_ranking(completions: Any, ranking: Any) -> list[Any]:
    """`completions` reordered best first by `ranking`, a permutation of their indices."""
    if not isinstance(completions, list | tuple) or not isinstance(ranking, list | tuple):
        raise AdapterError("unrecognised_shape", "'completions' and 'ranking' must both be lists")
    indices_ok = all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not indices_ok or sorted(ranking) != list(range(len(completions))):
        raise AdapterError(
            "unrecognised_shape",
            f"'ranking' {shown_value(list(ranking))} must list each 0-based index of the "
            f"{len(completions)} completions exactly once, best first",
        )
    return [completions[index] for index in ranking]


def _adapt_ranked(record: Record) -> dict[str, Any]:
    responses = record.get("responses")
    if responses is None and not _is_missing(record, "completions"):
        responses = _ranked_from_ranking(record["completions"], record.get("ranking"))
    if isinstance(responses, list | tuple):
        responses = [
            assistant_reply(response, f"responses[{index}]")
            for index, response in enumerate(responses)
        ]
    return {"prompt": normalise_prompt(record.get("prompt")), "responses": responses}


def _adapt_prompts(record: Record) -> dict[str, Any]:
    if _is_missing(record, "prompt"):
        if not _is_missing(record, "chosen") or not _is_missing(record, "rejected"):
            return {"prompt": _adapt_preference(record)["prompt"]}
        if not _is_missing(record, "messages"):
            return {"prompt": _adapt_sft(record)["prompt"]}
    return {"prompt": normalise_prompt(record.get("prompt"))}


_ADAPTERS: dict[str, Callable[[Record], dict[str, Any]]] = {
    "sft": _adapt_sft,
    "preference": _adapt_preference,
    "ranked": _adapt_ranked,
    "prompts": _adapt_prompts,
}


def _passed_through(record: Record, kind: str) -> dict[str, Any]:
    """The kind's optional fields and `split` present in the record."""
    optional = {field: record[field] for field in OPTIONAL_FIELDS[kind] if field in record}
    created_at = optional.get("created_at")
    if hasattr(created_at, "isoformat") and not isinstance(created_at, str):
        optional["created_at"] = created_at.isoformat()
    split = record.get(SPLIT_FIELD)
    if split is not None:
        optional[SPLIT_FIELD] = canonical_split_name(split) or split
    return optional


def adapt_record(record: Record, kind: str) -> dict[str, Any]:
    """The canonical row of `kind` for one input record (see the module docstring).

    The result holds every required field of the kind (None where the input lacks it), the
    optional fields and ``split`` the record has, and nothing else. Raises AdapterError when a
    recognised shape cannot be converted.
    """
    canonical = _ADAPTERS[check_kind(kind)](record)
    row = {field: canonical.get(field) for field in REQUIRED_FIELDS[kind]}
    row.update(_passed_through(record, kind))
    return row
