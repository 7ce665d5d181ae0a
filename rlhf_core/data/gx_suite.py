"""The Great Expectations side of validation: the expectations of each suite (one per quarantine
reason, named in `meta["reason_code"]`), and running a suite on a frame in a fresh ephemeral
context (Data Docs optional). Great Expectations is imported lazily: it takes seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlhf_core.config.data import ValidationSettings
from rlhf_core.data.expectations import ROW_NUMBER, RowFindings
from rlhf_core.data.schemas import REQUIRED_FIELDS

DOCS_SITE = "rlhf_validation"


def _great_expectations() -> Any:
    """The `great_expectations` module, imported with analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations

    return great_expectations


def new_context(docs_dir: Path | None = None) -> Any:
    """A fresh ephemeral GX context without progress bars, with a Data Docs site in `docs_dir`."""
    gx = _great_expectations()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name=DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def _exception_messages(info: dict[str, Any] | None) -> list[str]:
    """Messages of the exceptions GX caught; `info` is flat or keyed by metric id."""
    if not info:
        return []
    if "raised_exception" in info:
        return [str(info.get("exception_message"))] if info["raised_exception"] else []
    return [
        message
        for nested in info.values()
        if isinstance(nested, dict)
        for message in _exception_messages(nested)
    ]


def run_suite(context: Any, name: str, expectations: list[Any], frame: pd.DataFrame) -> Any:
    """Run `expectations` as suite `name` over `frame`, failing rows listed by `ROW_NUMBER`.

    GX records an expectation it could not evaluate as failed without listing any rows; that
    would let bad rows through, so it is raised as a RuntimeError instead.
    """
    gx = _great_expectations()
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole frame")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_NUMBER]},
    )
    for outcome in result.results:
        messages = _exception_messages(outcome.exception_info)
        if messages:
            raise RuntimeError(
                f"Great Expectations could not evaluate {outcome.expectation_config.type} in "
                f"suite {name}: {messages[0]}"
            )
    return result


def _in_true(column: str, code: str, description: str) -> Any:
    import great_expectations.expectations as gxe

    return gxe.ExpectColumnValuesToBeInSet(
        column=column, value_set=[True], meta={"reason_code": code}, description=description
    )


def _between(column: str, code: str, description: str, **bounds: int) -> Any:
    import great_expectations.expectations as gxe

    return gxe.ExpectColumnValuesToBeBetween(
        column=column, meta={"reason_code": code}, description=description, **bounds
    )


def row_expectations(
    kind: str, settings: ValidationSettings, *, with_tokens: bool, with_split: bool
) -> list[Any]:
    """The GX expectations of the row suite of `kind`; each `meta["reason_code"]` names its code.

    `missing_field` has one not-null expectation per required field; every other code has
    exactly one expectation on its derived column.
    """
    import great_expectations.expectations as gxe

    expectations: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(
            column=name,
            meta={"reason_code": "missing_field"},
            description=f"Required field `{name}` is present (missing_field).",
        )
        for name in REQUIRED_FIELDS[kind]
    ]
    expectations.append(
        _in_true("has_expected_types", "wrong_type", "Fields have their schema types.")
    )
    if kind == "preference":
        expectations.append(
            _in_true("margin_is_valid", "invalid_margin", "Margin is a finite number or null.")
        )
    expectations += [
        _in_true("text_is_valid", "invalid_text", "No control characters or lone surrogates."),
        _in_true("text_is_nonempty", "empty_text", "No text is empty after stripping."),
        _between(
            "longest_text_chars",
            "too_long_chars",
            "Every text is within max_chars characters.",
            max_value=settings.max_chars,
        ),
    ]
    if with_tokens and settings.max_tokens is not None:
        expectations.append(
            _between(
                "longest_sequence_tokens",
                "too_long_tokens",
                "Prompt plus longest response is within max_tokens tokens.",
                max_value=settings.max_tokens,
            )
        )
    if with_tokens:
        expectations += [
            _between(
                "shortest_text_tokens",
                "too_short_tokens",
                "The shortest response has at least min_tokens tokens.",
                min_value=settings.min_tokens,
            ),
        ]
    expectations.append(
        _in_true("roles_are_valid", "invalid_role", "Roles are known; the prompt ends with user.")
    )
    if kind == "preference":
        expectations.append(
            _in_true(
                "chosen_differs_from_rejected",
                "chosen_equals_rejected",
                "Chosen and rejected differ after stripping whitespace.",
            )
        )
    if kind == "ranked":
        expectations += [
            _between("response_count", "too_few_responses", "At least 2 responses.", min_value=2),
            _in_true("responses_are_distinct", "duplicate_response", "Responses are distinct."),
        ]
    if settings.check_duplicates:
        expectations.append(
            _in_true("is_first_occurrence", "duplicate_row", "No row repeats an earlier row.")
        )
    if with_split:
        expectations.append(
            _in_true(
                "prompt_not_in_train_split",
                "prompt_in_train_and_eval",
                "No eval prompt appears in the train split.",
            )
        )
    return expectations


def length_bias_expectations(settings: ValidationSettings) -> list[Any]:
    """Dataset-level GX expectations: chosen is longer (or shorter) in at most the threshold."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnMeanToBeBetween(
            column=column,
            min_value=0.0,
            max_value=settings.length_bias_threshold,
            meta={"warning_code": "length_bias"},
            description=f"Fraction of valid pairs where {label} is at most the bias threshold.",
        )
        for column, label in (
            ("chosen_is_longer", "chosen is longer than rejected"),
            ("chosen_is_shorter", "chosen is shorter than rejected"),
        )
    ]


def length_bias_warnings(
    context: Any,
    kind: str,
    valid_findings: list[RowFindings],
    settings: ValidationSettings,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run the data-set suite on the valid preference pairs; warn when it fails."""
    if kind != "preference" or not valid_findings:
        return [], None
    frame = pd.DataFrame(
        {
            ROW_NUMBER: np.arange(len(valid_findings), dtype="int64"),
            "chosen_is_longer": [row.values["chosen_is_longer"] for row in valid_findings],
            "chosen_is_shorter": [row.values["chosen_is_shorter"] for row in valid_findings],
        }
    )
    result = run_suite(context, f"rlhf_{kind}_dataset", length_bias_expectations(settings), frame)
    warnings = []
    for outcome in result.results:
        fraction = outcome.result.get("observed_value")
        if outcome.success or fraction is None:
            continue
        column = outcome.expectation_config.kwargs["column"]
        direction = "longer" if column == "chosen_is_longer" else "shorter"
        warnings.append(
            {
                "code": "length_bias",
                "detail": (
                    f"chosen is {direction} than rejected in {fraction:.0%} of "
                    f"{len(valid_findings)} valid pairs, above length_bias_threshold="
                    f"{settings.length_bias_threshold}; a reward model may learn length "
                    "instead of quality"
                ),
                "value": float(fraction),
            }
        )
    return warnings, result.to_json_dict()
