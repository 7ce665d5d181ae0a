"""Tests for rlhf_core/data/readers.py: every format reads back the same canonical rows."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_core.data.raw_records import REJECTED_COLUMNS
from rlhf_core.data.readers import ReadResult, read_records, to_hf_dataset
from rlhf_core.data.schemas import OPTIONAL_FIELDS, REQUIRED_FIELDS


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# Canonical rows of each kind, every field present (None where absent) as the reader returns them.
CANONICAL_ROWS: dict[str, list[dict[str, Any]]] = {
    "sft": [
        {"prompt": [user("Say hi.")], "completion": "Hi!"},
        {"prompt": [], "completion": "Once upon a time, ünïcödé 🙂."},
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                user("A"),
                assistant("B"),
                user("C"),
            ],
            "completion": "D",
        },
    ],
    "preference": [
        {
            "prompt": [user("Capital of France?")],
            "chosen": "Paris.",
            "rejected": "Lyon.",
            "margin": 1.5,
            "source": "vendor-a",
            "annotator": "ann-1",
            "created_at": "2026-01-02T03:04:05+00:00",
        },
        {
            "prompt": [user('Line one\nline two, with "quotes"')],
            "chosen": "Yes,\nit is.",
            "rejected": "",
            "margin": None,
            "source": None,
            "annotator": None,
            "created_at": None,
        },
    ],
    "ranked": [
        {"prompt": [user("Name a colour.")], "responses": ["Blue.", "A colour.", "No."]},
        {"prompt": [user("2+2?")], "responses": ["4", "5"]},
    ],
    "prompts": [
        {"prompt": [user("Write a haiku.")], "meta": {"topic": "poems", "id": 3}},
        {"prompt": [user("Tell a joke.")], "meta": None},
    ],
}

# ---------------------------------------------------------------- writers, one per format


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")
    return path


def write_jsonl_gz(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".jsonl.gz")
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_json_array(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(rows, indent=2), "utf-8")
    return path


def write_json_data_key(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps({"data": rows, "version": 2}), "utf-8")
    return path


def write_parquet(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".parquet")
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    path = path.with_suffix(".csv")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    key: json.dumps(value) if isinstance(value, list | dict) else value
                    for key, value in row.items()
                }
            )
    return path


def write_saved_dataset(rows: list[dict], path: Path) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_saved_dataset_dict(rows: list[dict], path: Path) -> Path:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


WRITERS: dict[str, Callable[[list[dict], Path], Path]] = {
    "jsonl": write_jsonl,
    "jsonl_gz": write_jsonl_gz,
    "json_array": write_json_array,
    "json_data_key": write_json_data_key,
    "parquet": write_parquet,
    "csv": write_csv,
    "save_to_disk_dataset": write_saved_dataset,
    "save_to_disk_dataset_dict": write_saved_dataset_dict,
}


def content(frame: pd.DataFrame, kind: str) -> list[dict]:
    fields = REQUIRED_FIELDS[kind] + OPTIONAL_FIELDS[kind]
    return [{field: row[field] for field in fields} for row in frame.to_dict(orient="records")]


def assert_counts_conserved(result: ReadResult, non_blank_records: int) -> None:
    assert len(result.frame) + len(result.rejected) == non_blank_records


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("format_name", sorted(WRITERS))
@pytest.mark.parametrize("kind", sorted(CANONICAL_ROWS))
def test_canonical_rows_round_trip_through_every_format(
    format_name: str, kind: str, tmp_path: Path
) -> None:
    rows = CANONICAL_ROWS[kind]
    path = WRITERS[format_name](rows, tmp_path / "data")
    result = read_records([str(path)], kind)
    assert len(result.rejected) == 0
    if format_name == "csv":  # CSV cannot tell an empty string from a missing value
        rows = [{key: None if value == "" else value for key, value in row.items()} for row in rows]
    assert content(result.frame, kind) == rows
    assert list(result.frame["source_file"]) == [str(path)] * len(rows)
    first_line = 2 if format_name == "csv" else 1  # the CSV header is line 1
    assert list(result.frame["source_line"]) == list(range(first_line, first_line + len(rows)))
    expected_split = "train" if format_name == "save_to_disk_dataset_dict" else None
    assert list(result.frame["split"]) == [expected_split] * len(rows)


@pytest.mark.parametrize("kind", sorted(CANONICAL_ROWS))
def test_frame_has_every_field_of_the_kind_as_object_columns(kind: str, tmp_path: Path) -> None:
    path = write_jsonl([{"prompt": "only a prompt"}], tmp_path / "data")
    frame = read_records([path], kind).frame
    fields = list(REQUIRED_FIELDS[kind] + OPTIONAL_FIELDS[kind])
    assert list(frame.columns) == [*fields, "split", "source_file", "source_line"]
    assert all(frame[column].dtype == object for column in [*fields, "split", "source_file"])
    assert frame["source_line"].dtype == "int64"
    (row,) = frame.to_dict(orient="records")
    assert all(row[field] is None for field in fields if field != "prompt")


def test_rows_of_several_files_keep_their_own_provenance(tmp_path: Path) -> None:
    first = write_jsonl(CANONICAL_ROWS["sft"][:2], tmp_path / "first")
    second = write_csv(CANONICAL_ROWS["sft"][2:], tmp_path / "second")
    frame = read_records([first, str(second)], "sft").frame
    assert list(frame["source_file"]) == [str(first), str(first), str(second)]
    assert list(frame["source_line"]) == [1, 2, 2]
    assert content(frame, "sft") == CANONICAL_ROWS["sft"]


def test_a_single_path_is_accepted_without_a_list(tmp_path: Path) -> None:
    path = write_jsonl(CANONICAL_ROWS["ranked"], tmp_path / "data")
    assert content(read_records(path, "ranked").frame, "ranked") == CANONICAL_ROWS["ranked"]


# ---------------------------------------------------------------- JSON layouts and splits


def test_json_split_keys_set_the_split(tmp_path: Path) -> None:
    rows = CANONICAL_ROWS["sft"]
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": rows[:2], "test": rows[2:]}), "utf-8")
    frame = read_records([path], "sft").frame
    assert list(frame["split"]) == ["train", "train", "eval"]
    assert list(frame["source_line"]) == [1, 2, 3]
    assert content(frame, "sft") == rows


def test_dataset_dict_split_names_map_to_train_and_eval(tmp_path: Path) -> None:
    rows = CANONICAL_ROWS["ranked"]
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:1]),
            "validation": datasets.Dataset.from_list(rows[1:]),
        }
    ).save_to_disk(str(path))
    frame = read_records([path], "ranked").frame
    assert list(frame["split"]) == ["train", "eval"]
    assert content(frame, "ranked") == rows


def test_a_records_own_split_is_kept_and_normalised(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "x", "split": "validation"},
        {"prompt": "b", "completion": "y", "split": "train"},
        {"prompt": "c", "completion": "z"},
    ]
    frame = read_records([write_jsonl(rows, tmp_path / "data")], "sft").frame
    assert list(frame["split"]) == ["eval", "train", None]


def test_json_file_that_is_not_valid_json_is_one_rejection_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": oops}\n]\n', "utf-8")
    result = read_records([path], "sft")
    assert len(result.frame) == 0
    assert result.rejected[["source_line", "reason"]].values.tolist() == [[3, "malformed_json"]]


def test_json_array_element_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, [1, 2], 7]), "utf-8")
    result = read_records([path], "sft")
    assert list(result.frame["source_line"]) == [1]
    assert result.rejected[["source_line", "reason"]].values.tolist() == [
        [2, "not_an_object"],
        [3, "not_an_object"],
    ]


def test_json_object_with_unknown_layout_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}), "utf-8")
    result = read_records([path], "sft")
    assert_counts_conserved(result, 1)
    assert list(result.rejected["reason"]) == ["unrecognised_shape"]


# ---------------------------------------------------------------- JSONL provenance and failures

GOOD = {"prompt": "Q", "chosen": "a", "rejected": "b"}


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD)
    path.write_text(f"{good}\n\n{good}\n   \n\n{good}\n", "utf-8")
    result = read_records([path], "preference")
    assert list(result.frame["source_line"]) == [1, 3, 6]
    assert_counts_conserved(result, 3)


def test_malformed_json_line_is_rejected_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD)
    path.write_text(f'{good}\n{good}\n{{"prompt": "Q", "chosen": \n{good}\n', "utf-8")
    result = read_records([path], "preference")
    assert list(result.frame["source_line"]) == [1, 2, 4]
    rejected = result.rejected.to_dict(orient="records")
    assert [(row["source_line"], row["reason"]) for row in rejected] == [(3, "malformed_json")]
    assert rejected[0]["raw"] == '{"prompt": "Q", "chosen":'
    assert rejected[0]["detail"]


def test_invalid_utf8_line_is_rejected_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a"}\n' + good + b"\n")
    result = read_records([path], "preference")
    assert list(result.frame["source_line"]) == [1, 3]
    (rejected,) = result.rejected.to_dict(orient="records")
    assert (rejected["source_line"], rejected["reason"]) == (2, "invalid_utf8")
    assert rejected["raw"] == '{"prompt": "caf\\xe9", "chosen": "a"}'


@pytest.mark.parametrize("line", ["[1, 2]", "42", '"just text"', "null", "true"])
def test_jsonl_line_that_is_not_an_object_is_rejected(line: str, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n{line}\n", "utf-8")
    result = read_records([path], "preference")
    assert list(result.frame["source_line"]) == [1]
    assert result.rejected[["source_line", "reason", "raw"]].values.tolist() == [
        [2, "not_an_object", line]
    ]


def test_hh_prefix_mismatch_is_a_rejected_row(tmp_path: Path) -> None:
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Ciao",
        "rejected": "\n\nHuman: Hey\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Later",
    }
    path = write_jsonl([GOOD, record], tmp_path / "data")
    result = read_records([path], "preference")
    assert list(result.frame["source_line"]) == [1]
    assert result.rejected[["source_line", "reason"]].values.tolist() == [[2, "hh_prefix_mismatch"]]


def test_raw_text_is_clipped_to_2000_characters(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "' + "x" * 5000 + "\n", "utf-8")
    (rejected,) = read_records([path], "sft").rejected.to_dict(orient="records")
    assert rejected["reason"] == "malformed_json"
    assert len(rejected["raw"]) == 2000


LINE_KINDS = {
    "good": (json.dumps(GOOD).encode(), None),
    "blank": (b"  ", "blank"),
    "malformed": (b'{"prompt": ', "malformed_json"),
    "not_object": (b"[1]", "not_an_object"),
    "bad_utf8": (b'{"prompt": "\xff"}', "invalid_utf8"),
    "hh_mismatch": (
        json.dumps(
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
        ).encode(),
        "hh_prefix_mismatch",
    ),
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(line_kinds=st.lists(st.sampled_from(sorted(LINE_KINDS)), max_size=15))
def test_counts_are_conserved_and_each_failure_is_on_its_own_line(
    line_kinds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("mixed") / "data.jsonl"
    path.write_bytes(b"".join(LINE_KINDS[name][0] + b"\n" for name in line_kinds))
    result = read_records([path], "preference")
    expected_good, expected_rejected = [], []
    for line_number, name in enumerate(line_kinds, start=1):
        reason = LINE_KINDS[name][1]
        if reason is None:
            expected_good.append(line_number)
        elif reason != "blank":
            expected_rejected.append([line_number, reason])
    assert_counts_conserved(result, sum(name != "blank" for name in line_kinds))
    assert list(result.frame["source_line"]) == expected_good
    assert result.rejected[["source_line", "reason"]].values.tolist() == expected_rejected


# ---------------------------------------------------------------- CSV specifics


def test_csv_line_numbers_count_the_header_blank_lines_and_multiline_cells(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        "prompt,completion\n"  # line 1
        "first,one\n"  # line 2
        "\n"  # line 3 (blank, skipped)
        '"multi\nline prompt",two\n'  # lines 4-5
        "third,three\n",  # line 6
        "utf-8",
    )
    result = read_records([path], "sft")
    assert list(result.frame["source_line"]) == [2, 4, 6]
    assert [row[0]["content"] for row in result.frame["prompt"]] == [
        "first",
        "multi\nline prompt",
        "third",
    ]
    assert_counts_conserved(result, 3)


def test_csv_cells_empty_json_and_margin(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    rows = [
        ["prompt", "chosen", "rejected", "margin", "source"],
        [json.dumps([user("Q")]), '["not", "decoded"]', "", "2.5", ""],
        ["plain prompt", "a", "b", "very", "x"],
        ["[not json", "a", "b", "", ""],
    ]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    frame = read_records([path], "preference").frame
    assert content(frame, "preference") == [
        {
            "prompt": [user("Q")],
            "chosen": '["not", "decoded"]',  # response cells stay text
            "rejected": None,
            "margin": 2.5,
            "source": None,
            "annotator": None,
            "created_at": None,
        },
        {
            "prompt": [user("plain prompt")],
            "chosen": "a",
            "rejected": "b",
            "margin": "very",  # left for validation to flag
            "source": "x",
            "annotator": None,
            "created_at": None,
        },
        {
            "prompt": [user("[not json")],
            "chosen": "a",
            "rejected": "b",
            "margin": None,
            "source": None,
            "annotator": None,
            "created_at": None,
        },
    ]


def test_csv_ranked_cells_hold_json_lists(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('prompt,completions,ranking\nQ,"[""worst"", ""best""]","[1, 0]"\n', "utf-8")
    frame = read_records([path], "ranked").frame
    assert content(frame, "ranked") == [{"prompt": [user("Q")], "responses": ["best", "worst"]}]


def test_csv_row_with_invalid_utf8_or_too_many_cells_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,completion\nok,fine\nbad \xff byte,x\na,b,extra\nok2,fine2\n")
    result = read_records([path], "sft")
    assert list(result.frame["source_line"]) == [2, 5]
    assert result.rejected[["source_line", "reason"]].values.tolist() == [
        [3, "invalid_utf8"],
        [4, "unrecognised_shape"],
    ]
    assert result.rejected["raw"].iloc[0] == "bad \\xff byte,x"


def test_csv_with_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("prompt,completion\nQ,A\n".encode("utf-8-sig"))
    assert content(read_records([path], "sft").frame, "sft") == [
        {"prompt": [user("Q")], "completion": "A"}
    ]


# ---------------------------------------------------------------- empty inputs and errors


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("empty.jsonl", ""),
        ("blank_lines.jsonl", "\n\n  \n"),
        ("empty.json", ""),
        ("empty_array.json", "[]"),
        ("empty.csv", ""),
        ("header_only.csv", "prompt,chosen,rejected\n"),
        ("empty.parquet", ""),
    ],
)
def test_empty_inputs_give_zero_rows_and_zero_rejections(
    name: str, text: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    result = read_records([path], "preference")
    assert len(result.frame) == 0 and len(result.rejected) == 0
    assert "chosen" in result.frame.columns
    assert list(result.rejected.columns) == list(REJECTED_COLUMNS)


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        read_records([tmp_path / "missing.jsonl"], "sft")


def test_missing_nested_path_without_extension_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records([str(tmp_path / "data" / "raw")], "sft")


def test_unknown_extension_is_a_clear_value_error(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n", "utf-8")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*data\.txt"):
        read_records([path], "sft")


def test_directory_that_is_not_a_saved_dataset_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a datasets save_to_disk directory"):
        read_records([tmp_path], "sft")


def test_unknown_kind_is_a_clear_value_error(tmp_path: Path) -> None:
    path = write_jsonl([GOOD], tmp_path / "data")
    with pytest.raises(ValueError, match="unknown data kind 'pairs'"):
        read_records([path], "pairs")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_id_while_offline_is_a_clear_error(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the reader must not call load_dataset while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(ValueError, match=r"'Anthropic/hh-rlhf'.*hub access is off"):
        read_records(["Anthropic/hh-rlhf"], "preference")


def test_hub_id_while_online_reads_every_split(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go",
    }
    requested = []

    def fake_load_dataset(dataset_id: str) -> datasets.DatasetDict:
        requested.append(dataset_id)
        split = datasets.Dataset.from_list([hh])
        return datasets.DatasetDict({"train": split, "test": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    frame = read_records(["Anthropic/hh-rlhf"], "preference").frame
    assert requested == ["Anthropic/hh-rlhf"]
    assert list(frame["split"]) == ["train", "eval"]
    assert list(frame["source_file"]) == ["Anthropic/hh-rlhf"] * 2
    assert list(frame["chosen"]) == ["Hello", "Hello"]


# ---------------------------------------------------------------- to_hf_dataset


def test_to_hf_dataset_keeps_message_lists(tmp_path: Path) -> None:
    rows = CANONICAL_ROWS["sft"]
    frame = read_records([write_jsonl(rows, tmp_path / "data")], "sft").frame
    dataset = to_hf_dataset(frame)
    assert len(dataset) == len(rows)
    assert [{"prompt": row["prompt"], "completion": row["completion"]} for row in dataset] == rows
    assert dataset["source_line"] == [1, 2, 3]


def test_to_hf_dataset_stores_free_form_meta_as_json_text(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "meta": {"topic": "x"}},
        {"prompt": "b", "meta": "plain note"},
        {"prompt": "c"},
    ]
    frame = read_records([write_jsonl(rows, tmp_path / "data")], "prompts").frame
    dataset = to_hf_dataset(frame)
    assert dataset["meta"] == ['{"topic":"x"}', "plain note", None]
    assert dataset["prompt"][0] == [user("a")]


def test_to_hf_dataset_of_mixed_value_types_is_a_clear_error(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "completion": "text"}, {"prompt": "b", "completion": 3.5}]
    frame = read_records([write_jsonl(rows, tmp_path / "data")], "sft").frame
    with pytest.raises(ValueError, match="validate the data"):
        to_hf_dataset(frame)


def test_a_row_nested_too_deep_for_json_is_one_quarantined_row_not_a_lost_file(tmp_path):
    """100 000 nested lists raise RecursionError in json.loads: before, the exception lost
    the whole file (and blocked every retrain); now that row alone is rejected with a reason,
    in JSON Lines, in a JSON file (the whole document is that one value) and in a CSV cell."""
    good = {"prompt": "Review film 1.", "chosen": "Great film.", "rejected": "Dull film."}
    deep = "[" * 100_000 + "]" * 100_000
    lines = tmp_path / "pairs.jsonl"
    poison = '{"prompt": "p", "chosen": ' + deep + ', "rejected": "b"}'
    lines.write_text("\n".join([json.dumps(good), poison, json.dumps(good)]) + "\n")
    result = read_records([lines], "preference")
    assert len(result.frame) == 2
    assert list(result.rejected["reason"]) == ["too_deeply_nested"]
    assert list(result.rejected["source_line"]) == [2]
    assert len(result.rejected["raw"].iloc[0]) < 10_000  # a clipped prefix, not the row

    document = tmp_path / "pairs.json"
    document.write_text("[" + json.dumps(good) + ", " + deep + "]")
    assert list(read_records([document], "preference").rejected["reason"]) == ["too_deeply_nested"]

    table = tmp_path / "pairs.csv"
    table.write_text(f"prompt,chosen,rejected\nReview film 2.,{deep},Dull.\n")
    csv_result = read_records([table], "preference")
    assert len(csv_result.frame) + len(csv_result.rejected) == 1  # read, never raised


# --------------------------------------------------------------------------------------------
# Poison input: size limits, oversized records, unparseable and damaged files
# --------------------------------------------------------------------------------------------

PAIR = {"prompt": "Review film 1.", "chosen": "Great film.", "rejected": "Dull film."}
MiB = 2**20


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_a_file_over_the_file_limit_is_refused_before_it_is_read(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"big.{suffix}"
    path.write_bytes(b"\x00" * (MiB + 1))  # not even valid: the size alone refuses it
    with pytest.raises(
        ValueError,
        match=r"big\.\w+ is 1,048,577 bytes, more than the 1 MiB \(1,048,576 bytes\) limit",
    ) as info:
        read_records([path], "preference", max_file_bytes=MiB)
    assert "data.validation.max_file_mb" in str(info.value)


def test_a_gzip_file_that_inflates_past_the_file_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        for _ in range(3):
            handle.write((json.dumps(PAIR) + "\n").encode() * 20_000)  # ~1.4 MB inflated each
    assert path.stat().st_size < MiB
    with pytest.raises(ValueError, match=r"bomb\.jsonl\.gz holds more than 2097152 bytes"):
        read_records([path], "preference", max_file_bytes=2 * MiB)


def test_a_json_lines_record_over_the_row_limit_is_rejected_without_being_held(
    tmp_path: Path,
) -> None:
    """A 20 MB line under a 1 MiB row limit: one row_too_large rejection holding a prefix and
    the sha256 and size of the whole line, the next line read as usual, and the reader never
    holding the line (peak traced memory far below its size)."""
    import hashlib
    import tracemalloc

    huge = json.dumps({**PAIR, "chosen": "x" * 20_000_000}).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(huge + b"\n" + json.dumps(PAIR).encode() + b"\n")
    tracemalloc.start()
    try:
        result = read_records([path], "preference", max_row_bytes=MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * MiB  # the line is 20 MB
    assert list(result.frame["source_line"]) == [2]
    (rejected,) = result.rejected.to_dict(orient="records")
    assert rejected["reason"] == "row_too_large" and rejected["source_line"] == 1
    assert f"{len(huge) + 1} bytes, more than the {MiB}-byte limit" in rejected["detail"]
    assert rejected["raw_bytes"] == len(huge) + 1  # with its newline
    assert rejected["raw_sha256"] == hashlib.sha256(huge + b"\n").hexdigest()
    assert rejected["raw"] == huge[:2000].decode()


def test_a_csv_row_over_the_row_limit_is_rejected_and_the_next_row_is_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected\n"
        f"Review film 1.,{'x' * (3 * MiB)},Dull.\n"
        "Review film 2.,Great.,Dull.\n",
        encoding="utf-8",
    )
    result = read_records([path], "preference", max_row_bytes=MiB)
    assert result.frame[["prompt", "source_line"]].values.tolist() == [
        [[user("Review film 2.")], 3]
    ]
    (rejected,) = result.rejected.to_dict(orient="records")
    assert (rejected["reason"], rejected["source_line"]) == ("row_too_large", 2)
    assert rejected["raw_bytes"] == len("Review film 1.,,Dull.\n") + 3 * MiB
    assert rejected["raw"].startswith("Review film 1.,xxx") and len(rejected["raw"]) == 2000


@pytest.mark.parametrize("writer", [write_json_array, write_parquet], ids=["json", "parquet"])
def test_a_parsed_record_over_the_row_limit_is_rejected(
    tmp_path: Path, writer: Callable[[list[dict], Path], Path]
) -> None:
    rows = [{**PAIR, "chosen": "x" * (2 * MiB)}, PAIR]
    path = writer(rows, tmp_path / "pairs")
    result = read_records([path], "preference", max_row_bytes=MiB)
    assert list(result.frame["source_line"]) == [2]
    (rejected,) = result.rejected.to_dict(orient="records")
    assert (rejected["reason"], rejected["source_line"]) == ("row_too_large", 1)
    assert rejected["raw_bytes"] > 2 * MiB and len(rejected["raw"]) == 2000


def test_an_integer_too_long_for_python_is_one_rejected_row(tmp_path: Path) -> None:
    """json.loads raises ValueError (not JSONDecodeError) past 4300 digits; before, that lost
    the whole file."""
    path = tmp_path / "pairs.jsonl"
    poison = json.dumps(PAIR)[:-1] + ', "margin": ' + "9" * 5000 + "}"
    path.write_text(json.dumps(PAIR) + "\n" + poison + "\n", encoding="utf-8")
    result = read_records([path], "preference")
    assert len(result.frame) == 1
    (rejected,) = result.rejected.to_dict(orient="records")
    assert (rejected["reason"], rejected["source_line"]) == ("malformed_json", 2)
    assert "4300 digits" in rejected["detail"]
    assert rejected["raw_bytes"] == len(poison)


def test_random_bytes_are_refused_as_a_whole_not_quarantined_line_by_line(
    tmp_path: Path,
) -> None:
    """2 MB of random bytes (~8000 lines) would otherwise quarantine every line, several
    times the file's size; one good line first does not change that."""
    import random

    noise = random.Random(0).randbytes(2 * MiB)
    for name, data in [
        ("noise.jsonl", noise),
        ("good_then_noise.jsonl", json.dumps(PAIR).encode() + b"\n" + noise),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}: 1000 of its records could not be read"):
            read_records([path], "preference")


def test_a_file_of_mostly_good_rows_keeps_its_bad_lines_as_rejections(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({**PAIR, "prompt": f"Review film {n}."}) for n in range(50)]
    path.write_text("\n".join(lines + ["not json"] * 1000) + "\n", encoding="utf-8")
    result = read_records([path], "preference")
    assert (len(result.frame), len(result.rejected)) == (50, 1000)


def test_a_csv_file_whose_header_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,ch\xffosen,rejected\nReview film 1.,Great.,Dull.\n")
    with pytest.raises(ValueError, match=r"header \(first line\) of CSV file .*pairs.csv"):
        read_records([path], "preference")


def test_a_truncated_parquet_file_is_one_error_naming_it(tmp_path: Path) -> None:
    whole = write_parquet([PAIR] * 10, tmp_path / "pairs").read_bytes()
    path = tmp_path / "cut.parquet"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.parquet is not a readable Parquet file"):
        read_records([path], "preference")


def test_a_truncated_gzip_file_is_one_error_naming_it(tmp_path: Path) -> None:
    whole = gzip.compress((json.dumps(PAIR) + "\n").encode() * 100)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz is not a readable gzip file"):
        read_records([path], "preference")


def test_a_parquet_string_that_is_not_utf8_is_one_error_naming_the_file(tmp_path):
    """Parquet strings are UTF-8 by the format; pyarrow checks only when a batch becomes
    Python values (found by the fuzz test: a UnicodeDecodeError that named no file)."""
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "damaged.parquet"
    table = pyarrow.table({"prompt": ["Review film 0."], "completion": ["Fine."]})
    pyarrow.parquet.write_table(table, path, compression="none", use_dictionary=False)
    path.write_bytes(path.read_bytes().replace(b"Review film 0.", b"Review film \x80."))
    with pytest.raises(ValueError, match="is not a readable Parquet file") as error:
        read_records([path], "sft")
    assert str(path) in str(error.value)
