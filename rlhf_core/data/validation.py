"""Dataset validation with Great Expectations: quarantine bad rows with a reason, report, Data Docs.

`validate_frame` runs a GX suite over derived check columns (see ``expectations``) and splits a
canonical frame into valid and quarantined rows; `validate_files` reads input files, validates
them and writes the stage outputs: ``report.json``, ``valid.parquet`` (+ ``valid.jsonl``),
``quarantine.jsonl`` and GX Data Docs under ``data_docs/``. Every input record ends up exactly
once in the valid set or the quarantine, so ``total == valid + quarantined`` always holds.

Great Expectations is imported lazily (it takes seconds), with analytics off
(``GX_ANALYTICS_ENABLED=false`` unless the caller set it) and progress bars disabled. Each call
uses a fresh ephemeral GX context: creating one takes milliseconds once GX is imported, and it
keeps the results (and Data Docs) of one call apart from those of the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.expectations import (
    REASON_PRIORITY,
    ROW_NUMBER,
    RowFindings,
    add_duplicate_flags,
    add_split_leak_flags,
    add_token_counts,
    inspect_row,
    is_missing,
    plain,
)
from rlhf_core.data.gx_suite import (
    DOCS_SITE,
    length_bias_warnings,
    new_context,
    row_expectations,
    run_suite,
)
from rlhf_core.data.schemas import SPLIT_FIELD, canonical_json, check_kind

if TYPE_CHECKING:
    from rlhf_core.data.readers import ReadResult

logger = logging.getLogger(__name__)

# Stored as JSON text in Parquet unless already a string (as `readers.to_hf_dataset` does):
# Arrow needs one type per column and these are free-form.
_FREE_FORM_FIELDS = ("meta",)


@dataclass
class ValidationOutcome:
    """The result of validating one frame.

    Attributes:
        valid: the rows that passed, with the input's columns and index.
        quarantined: the rows that failed, with the input's columns plus `reason` (the primary
            code, by `REASON_PRIORITY`), `reasons` (every failing code, in priority order) and
            `detail` (one sentence about the primary reason).
        warnings: data-set level findings, e.g. ``{"code": "length_bias", "detail": ...,
            "value": 0.83}``; they do not quarantine anything.
        gx_result: the GX validation result of the row suite, as its JSON dict.
        suite_name: the name of the row suite.
        dataset_gx_result: the GX result of the data-set suite (length bias of the valid
            preference pairs), or None when there was none to run.
    """

    valid: pd.DataFrame
    quarantined: pd.DataFrame
    warnings: list[dict[str, Any]]
    gx_result: dict[str, Any]
    suite_name: str
    dataset_gx_result: dict[str, Any] | None = None

    def reason_counts(self) -> dict[str, int]:
        """Quarantined rows per primary reason (sums to ``len(quarantined)``)."""
        return dict(Counter(self.quarantined["reason"])) if len(self.quarantined) else {}

    def failing_check_counts(self) -> dict[str, int]:
        """Quarantined rows per failing check, counting every reason of a row."""
        counts: Counter[str] = Counter()
        for reasons in self.quarantined.get("reasons", []):
            counts.update(reasons)
        return dict(counts)


def _derived_column(values: list[Any]) -> pd.Series:
    """Bool checks as an object column (True/False/None); counts as float (NaN where None)."""
    if any(isinstance(value, bool) for value in values):
        return pd.Series(values, dtype=object)
    return pd.Series([np.nan if value is None else value for value in values], dtype="float64")


def _check_frame(
    frame: pd.DataFrame, findings: list[RowFindings], expectations: list[Any]
) -> pd.DataFrame:
    """The frame GX sees: row numbers and each column an expectation checks.

    Required fields come from `frame` (absent ones as None), derived columns from `findings`.
    """
    columns: dict[str, Any] = {ROW_NUMBER: np.arange(len(frame), dtype="int64")}
    for expectation in expectations:
        name = expectation.column
        if expectation.meta["reason_code"] == "missing_field":
            values = frame[name].tolist() if name in frame.columns else [None] * len(frame)
            columns[name] = pd.Series(values, dtype=object)
        else:
            columns[name] = _derived_column([row.values[name] for row in findings])
    return pd.DataFrame(columns)


def _failing_codes(result: Any) -> dict[int, set[str]]:
    """Row number -> the reason codes of the expectations that row failed."""
    failing: dict[int, set[str]] = {}
    for outcome in result.results:
        code = outcome.expectation_config.meta.get("reason_code")
        for item in outcome.result.get("unexpected_index_list") or []:
            failing.setdefault(int(item[ROW_NUMBER]), set()).add(code)
    return failing


def _quarantine_columns(
    failing: dict[int, set[str]], findings: list[RowFindings]
) -> dict[str, list[Any]]:
    """`reason`, `reasons` and `detail` for each failing row number, in row order."""
    columns: dict[str, list[Any]] = {"reason": [], "reasons": [], "detail": []}
    for position in sorted(failing):
        reasons = sorted(failing[position], key=REASON_PRIORITY.index)
        primary = reasons[0]
        note = findings[position].notes.get(primary, f"the row failed the {primary} check")
        columns["reason"].append(primary)
        columns["reasons"].append(reasons)
        columns["detail"].append(note[:1].upper() + note[1:] + ".")  # one sentence
    return columns


def _inspect_frame(
    frame: pd.DataFrame, kind: str, settings: ValidationSettings, tokenizer: Any
) -> list[RowFindings]:
    """The pandas side: derived check values and failure sentences of every row."""
    rows = frame.to_dict(orient="records")
    findings = [inspect_row(row, kind, settings) for row in rows]
    if tokenizer is not None:
        add_token_counts(findings, kind, tokenizer, settings)
    if settings.check_duplicates:
        add_duplicate_flags(rows, kind, findings)
    if SPLIT_FIELD in frame.columns:
        add_split_leak_flags(rows, findings)
    return findings


def _validate_in_context(
    context: Any,
    frame: pd.DataFrame,
    kind: str,
    settings: ValidationSettings,
    tokenizer: Any,
) -> ValidationOutcome:
    """`validate_frame` in a given GX context (whose Data Docs site the caller may build)."""
    check_kind(kind)
    findings = _inspect_frame(frame, kind, settings, tokenizer)
    suite_name = f"rlhf_{kind}_rows"
    expectations = row_expectations(
        kind, settings, with_tokens=tokenizer is not None, with_split=SPLIT_FIELD in frame.columns
    )
    result = run_suite(
        context, suite_name, expectations, _check_frame(frame, findings, expectations)
    )
    failing = _failing_codes(result)

    quarantined = frame.iloc[sorted(failing)].copy()
    for name, values in _quarantine_columns(failing, findings).items():
        quarantined[name] = pd.Series(values, index=quarantined.index, dtype=object)
    good_positions = [position for position in range(len(frame)) if position not in failing]
    warnings, dataset_result = length_bias_warnings(
        context, kind, [findings[position] for position in good_positions], settings
    )
    if not len(frame):
        warnings.insert(0, {"code": "empty_input", "detail": "The input has no rows.", "value": 0})
    return ValidationOutcome(
        valid=frame.iloc[good_positions].copy(),
        quarantined=quarantined,
        warnings=warnings,
        gx_result=result.to_json_dict(),
        suite_name=suite_name,
        dataset_gx_result=dataset_result,
    )


def validate_frame(
    frame: pd.DataFrame,
    kind: str,
    settings: ValidationSettings | None = None,
    tokenizer: Any = None,
) -> ValidationOutcome:
    """Split a canonical frame of `kind` into valid and quarantined rows with GX.

    Checks (reason codes, see ``expectations`` for the details): required fields present
    (`missing_field`), schema types (`wrong_type`), margin a finite number or null
    (`invalid_margin`), no control characters or lone surrogates (`invalid_text`), no empty
    text (`empty_text`), length bounds in characters and, with `tokenizer`, tokens
    (`too_long_chars`, `too_long_tokens`, `too_short_tokens`), known roles and a prompt ending
    with a user turn (`invalid_role`), `chosen_equals_rejected`, `too_few_responses`,
    `duplicate_response`, `duplicate_row` (a repeat of an earlier row; the first stays valid)
    and, with a `split` column, `prompt_in_train_and_eval` (eval rows whose prompt is in the
    train split; the train rows stay).

    `tokenizer` is a transformers tokenizer or a `tokenizers.Tokenizer`; without one, token
    lengths are not checked. Raises ValueError for an unknown `kind`.
    """
    settings = settings or ValidationSettings()
    return _validate_in_context(new_context(), frame, kind, settings, tokenizer)


def _md5(path: Path) -> str:
    """Hex md5 of a file, or of a directory's files (relative names and bytes, sorted)."""
    digest = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """A value JSON can hold: numpy and pandas values made plain, NaN as None, inf as text."""
    value = plain(value)
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if is_missing(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return repr(value)


def _write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    # ASCII escapes keep lone surrogates (quarantined as invalid_text) writable as valid JSON.
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(_jsonable(record), ensure_ascii=True) + "\n")


def _write_valid(valid: pd.DataFrame, out_dir: Path) -> None:
    """`valid.parquet` and `valid.jsonl`: the canonical fields plus provenance."""
    _write_jsonl(valid.to_dict(orient="records"), out_dir / "valid.jsonl")
    table = valid.reset_index(drop=True)
    for name in _FREE_FORM_FIELDS:
        if name in table.columns:
            table[name] = [
                value if value is None or isinstance(value, str) else canonical_json(plain(value))
                for value in table[name]
            ]
    table.to_parquet(out_dir / "valid.parquet", index=False)


# Columns of a quarantine record that are not the row's own fields.
_QUARANTINE_META = ("source_file", "source_line", "reason", "reasons", "detail")


def bounded_quarantine_record(record: dict[str, Any]) -> dict[str, Any]:
    """A row-level quarantine record that can never be a copy of a huge row.

    `raw` is at most MAX_RAW_CHARS characters of the row's canonical JSON, with the
    `raw_sha256` and `raw_bytes` of all of it; the row's fields stay beside it only when that
    text fits whole in MAX_RAW_CHARS (so small rows remain easy to read), else they are left
    out, since any one of them may be the megabytes that got the row quarantined.
    """
    from rlhf_core.data.raw_records import MAX_RAW_CHARS, raw_digest, value_text

    fields = {key: value for key, value in record.items() if key not in _QUARANTINE_META}
    text = value_text(_jsonable(fields))
    sha256, size = raw_digest(text)
    kept = {key: record[key] for key in _QUARANTINE_META if key in record}
    if len(text) <= MAX_RAW_CHARS:
        kept.update(fields)
    return {**kept, "raw": text[:MAX_RAW_CHARS], "raw_sha256": sha256, "raw_bytes": size}


def _quarantine_records(
    quarantined: pd.DataFrame, rejected: pd.DataFrame, file_order: dict[str, int]
) -> list[dict[str, Any]]:
    """Row-level and read-level rejections as records, in input order (file, then line)."""
    records = [bounded_quarantine_record(r) for r in quarantined.to_dict(orient="records")]
    for rejection in rejected.to_dict(orient="records"):
        records.append({**rejection, "reasons": [rejection["reason"]]})
    return sorted(
        records,
        key=lambda r: (file_order.get(r.get("source_file"), len(file_order)), r["source_line"]),
    )


def _input_summaries(
    paths: Sequence[Path], names: Sequence[str], valid: pd.DataFrame, bad: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    valid_counts = Counter(valid["source_file"]) if "source_file" in valid else Counter()
    bad_counts = Counter(record.get("source_file") for record in bad)
    return [
        {
            "path": name,
            "md5": _md5(path),
            "rows": valid_counts[name] + bad_counts[name],
            "valid": valid_counts[name],
            "quarantined": bad_counts[name],
        }
        for path, name in zip(paths, names, strict=True)
    ]


def _frequent_reason_warnings(
    reason_counts: dict[str, int], total: int, settings: ValidationSettings
) -> list[dict[str, Any]]:
    """Warn for each reason that alone quarantines more than the gate allows."""
    allowed = 1.0 - settings.min_valid_fraction
    warnings = []
    for reason, count in sorted(reason_counts.items()):
        fraction = count / total
        if (total - count) / total < settings.min_valid_fraction:  # the gate's own arithmetic
            warnings.append(
                {
                    "code": "frequent_reason",
                    "reason": reason,
                    "detail": (
                        f"{count} of {total} rows ({fraction:.0%}) were quarantined for "
                        f"{reason}, more than the {allowed:.0%} that min_valid_fraction allows"
                    ),
                    "value": fraction,
                }
            )
    return warnings


def _report(
    kind: str,
    settings: ValidationSettings,
    outcome: ValidationOutcome,
    read: ReadResult,
    bad: list[dict[str, Any]],
) -> dict[str, Any]:
    """Counts, gate and warnings over row-level and read-level rejections together."""
    total = len(read.frame) + len(read.rejected)
    if total != len(outcome.valid) + len(bad):  # every record must land exactly once
        raise RuntimeError(
            f"validation lost track of records: {total} read, but {len(outcome.valid)} valid "
            f"and {len(bad)} quarantined; please report this bug"
        )
    rejected = read.rejected
    reasons = Counter(record["reason"] for record in bad)
    failing_checks = Counter(outcome.failing_check_counts())
    failing_checks.update(rejected["reason"].tolist() if len(rejected) else [])
    valid_fraction = len(outcome.valid) / total if total else 0.0
    warnings = [w for w in outcome.warnings if w["code"] != "empty_input"]
    warnings += _frequent_reason_warnings(dict(reasons), total, settings)
    if total == 0:
        warnings.insert(0, {"code": "empty_input", "detail": "The input has no rows.", "value": 0})
    return {
        "kind": kind,
        "total": total,
        "valid": len(outcome.valid),
        "quarantined": len(bad),
        "reasons": dict(sorted(reasons.items())),
        "failing_checks": dict(sorted(failing_checks.items())),
        "valid_fraction": valid_fraction,
        "min_valid_fraction": settings.min_valid_fraction,
        "passed": total > 0 and valid_fraction >= settings.min_valid_fraction,
        "warnings": warnings,
        "suite": outcome.suite_name,
        "gx_success": bool(outcome.gx_result.get("success")),
        "settings": asdict(settings),
    }


def _relative_name(name: str, root: Path) -> str:
    """`name` relative to `root` (posix) when the file lies under it, else as given."""
    try:
        return Path(name).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return name


def validate_files(
    paths: Sequence[str | Path],
    kind: str,
    out_dir: str | Path,
    settings: ValidationSettings | None = None,
    tokenizer: Any = None,
    data_docs: bool = True,
    docs_dir: str | Path | None = None,
    names_relative_to: str | Path | None = None,
) -> dict[str, Any]:
    """Read, validate and write the validation stage's outputs; return the report.

    Writes to `out_dir`: ``report.json``, ``valid.parquet`` and ``valid.jsonl`` (valid rows:
    canonical fields, ``split`` and provenance; free-form ``meta`` as JSON text in Parquet),
    ``quarantine.jsonl`` (one object per rejected record, in input order: ``reason``,
    ``reasons``, ``detail``, ``source_file``, ``source_line``, ``raw`` (at most MAX_RAW_CHARS
    characters of the record: its source text for read-level rejections, its canonical JSON
    for row-level ones), ``raw_sha256`` and ``raw_bytes`` of the whole record, and a
    row-level rejection's fields when its text fits in ``raw``: a huge row is never copied).
    With `data_docs`, GX Data Docs go to `docs_dir` (default
    ``<out_dir>/data_docs``; the pipeline's validate stage keeps them out of its DVC output,
    since GX stamps every page with the time of the run). With `names_relative_to` (the
    project root), input files are named relative to it in the rows' ``source_file`` and in
    the report, so the output does not depend on where the project lives.

    Everything written to `out_dir` is a pure function of the inputs and settings: no
    timings, no timestamps. The report holds ``kind``, ``total`` (readable rows plus
    read-level rejections), ``valid``, ``quarantined`` (``total == valid + quarantined``),
    ``reasons`` (primary reason -> count, read- and row-level; sums to ``quarantined``),
    ``failing_checks`` (every failing check of a row counted), ``valid_fraction``,
    ``min_valid_fraction``, ``passed``, ``warnings``, ``inputs`` (per path: ``path``,
    ``md5``, ``rows``, ``valid``, ``quarantined``), ``suite``, ``settings`` and, when the
    Data Docs are inside `out_dir`, ``data_docs`` (their path relative to it). The returned
    dict adds ``data_docs_index`` (absolute path or None) and ``elapsed_seconds``. An empty
    input has total 0, valid_fraction 0.0, ``passed: false`` and an ``empty_input`` warning:
    a stage that received no data should stop the pipeline, not train on nothing.
    """
    from rlhf_core.data.readers import read_records

    started = time.perf_counter()
    settings = settings or ValidationSettings()
    check_kind(kind)
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out = Path(out_dir).resolve()  # GX Data Docs need an absolute path
    out.mkdir(parents=True, exist_ok=True)
    docs = Path(docs_dir).resolve() if docs_dir is not None else out / "data_docs"
    shutil.rmtree(docs, ignore_errors=True)  # stale pages of an earlier run

    read = read_records(
        paths, kind, max_file_bytes=settings.max_file_bytes, max_row_bytes=settings.max_row_bytes
    )
    names = [os.fspath(path) for path in paths]
    if names_relative_to is not None:
        renamed = {name: _relative_name(name, Path(names_relative_to)) for name in names}
        for table in (read.frame, read.rejected):
            if "source_file" in table.columns:
                table["source_file"] = table["source_file"].map(lambda n: renamed.get(n, n))
        names = [renamed[name] for name in names]
    context = new_context(docs if data_docs else None)
    outcome = _validate_in_context(context, read.frame, kind, settings, tokenizer)
    bad = _quarantine_records(
        outcome.quarantined, read.rejected, {name: index for index, name in enumerate(names)}
    )
    _write_valid(outcome.valid, out)
    _write_jsonl(bad, out / "quarantine.jsonl")
    if data_docs:
        context.build_data_docs(site_names=[DOCS_SITE])

    report = _report(kind, settings, outcome, read, bad)
    report["inputs"] = _input_summaries([Path(p) for p in paths], names, outcome.valid, bad)
    if data_docs and docs.is_relative_to(out):
        report["data_docs"] = (docs / "index.html").relative_to(out).as_posix()
    with open(out / "report.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=False)
        handle.write("\n")
    logger.info(
        "validated %d %s rows: %d valid, %d quarantined (%s)",
        report["total"],
        kind,
        report["valid"],
        report["quarantined"],
        "passed" if report["passed"] else "failed",
    )
    return {
        **report,
        "data_docs_index": str(docs / "index.html") if data_docs else None,
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }
