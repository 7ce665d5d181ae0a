"""Lineage beside the outputs: DVC md5s, run markers, the producing run, chained stages."""

import json
import os

import pytest
from dvc_hashes import dvc_md5, md5

from rlhf_core.tracking.lineage import (
    RUN_INFO_FILE,
    git_state,
    path_md5,
    read_producer_run_id,
    run_marker_path,
)
from rlhf_core.tracking.runs import stage_run


@pytest.fixture
def client(tracking_store):
    """The MlflowClient of the module's store."""
    return tracking_store[1]


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == ("unknown", "unknown")


def test_path_md5_equals_dvc_for_files_and_directories(tmp_path):
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "a.jsonl").write_bytes(b'{"x": 1}\n')
    (data / "nested" / "b.bin").write_bytes(bytes(range(256)) * 5000)  # > one 1 MiB block
    (data / "nested" / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    assert path_md5(data / "a.jsonl") == md5(b'{"x": 1}\n')
    assert path_md5(data / "nested" / "b.bin") == md5(bytes(range(256)) * 5000)
    assert path_md5(data) == dvc_md5(data, tmp_path / "cache")
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        path_md5(tmp_path / "missing")


def test_directory_md5_follows_content_not_mtime(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00\x01\x02")
    (folder / "config.json").write_text("{}")
    before = path_md5(folder)
    os.utime(folder / "weights.bin", (1_000_000, 1_000_000))
    assert path_md5(folder) == before
    (folder / "weights.bin").write_bytes(b"\x00\x01\x03")
    changed = path_md5(folder)
    assert changed != before
    (folder / "weights.bin").rename(folder / "weights2.bin")
    assert path_md5(folder) != changed


def test_chained_stages_link_output_to_producing_run(client, tmp_path):
    model_dir = tmp_path / "artifacts" / "sft"
    with stage_run("sft", project_root=tmp_path) as producer:
        model_dir.mkdir(parents=True)
        (model_dir / "model.safetensors").write_bytes(b"weights")
        producer.record_output(model_dir)
    # The marker lies beside the output, never inside it: the output's md5 stays a function
    # of its content, whichever run wrote it.
    assert not (model_dir / RUN_INFO_FILE).exists()
    marker = json.loads(run_marker_path(model_dir).read_text())
    assert run_marker_path(model_dir) == tmp_path / "artifacts" / ".sft.run_info.json"
    assert marker["run_id"] == producer.run_id
    assert marker["stage"] == "sft"
    assert marker["md5"] == path_md5(model_dir)
    assert marker["output"] == "artifacts/sft"
    assert read_producer_run_id(model_dir / "model.safetensors") == producer.run_id

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes(b'{"prompt": "hi"}\n')
    with stage_run("reward", project_root=tmp_path, inputs={"sft": model_dir, "prefs": prefs}) as c:
        pass
    consumer_tags = client.get_run(c.run_id).data.tags
    producer_tags = client.get_run(producer.run_id).data.tags
    assert consumer_tags["input.sft.run_id"] == producer.run_id
    assert consumer_tags["input.sft.md5"] == dvc_md5(model_dir, tmp_path / "cache")
    assert consumer_tags["input.sft.md5"] == producer_tags["output.artifacts/sft.md5"]
    assert consumer_tags["input.prefs.md5"] == md5(b'{"prompt": "hi"}\n')
    assert "input.prefs.run_id" not in consumer_tags  # raw data: produced by no run


def test_missing_input_is_a_clear_error(client, tmp_path):
    with (
        pytest.raises(ValueError, match="Input 'prefs' does not exist"),
        stage_run("reward", project_root=tmp_path, inputs={"prefs": tmp_path / "nope.jsonl"}),
    ):
        pass


def test_same_content_from_two_runs_has_the_same_md5_and_the_marker_names_the_newest(
    client, tmp_path
):
    out = tmp_path / "artifacts" / "policy" / "dpo"
    ids, md5s = [], []
    for _ in range(2):
        with stage_run("dpo", project_root=tmp_path) as run:
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(b"same weights")
            run.record_output(out)
        ids.append(run.run_id)
        md5s.append(path_md5(out))
        # The folder holding the output (a dependency of a later stage) does not see the
        # marker either: path_md5 skips it, as .dvcignore tells DVC to.
        md5s.append(path_md5(out.parent))
    assert ids[0] != ids[1]
    assert md5s[0] == md5s[2] and md5s[1] == md5s[3]
    assert read_producer_run_id(out) == ids[1]


def test_a_marker_that_no_longer_matches_its_output_is_not_trusted(client, tmp_path):
    out = tmp_path / "artifacts" / "sft"
    versions = {}
    for content in (b"version one", b"version two"):
        with stage_run("sft", project_root=tmp_path) as run:
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(content)
            run.record_output(out)
        versions[content] = run.run_id
    # DVC restores the first version (a checkout from its cache): the marker still names the
    # second run, so the producer is looked up by the first version's md5 instead.
    (out / "model.safetensors").write_bytes(b"version one")
    assert read_producer_run_id(out) == versions[b"version one"]
    # Content no run produced: no producer, rather than a wrong one.
    (out / "model.safetensors").write_bytes(b"edited by hand")
    assert read_producer_run_id(out) is None


def test_an_unreadable_marker_is_ignored_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    run_marker_path(out).write_text("{not json")
    assert read_producer_run_id(out) is None
    assert "not a run marker" in caplog.text


def test_bytecode_caches_change_no_md5_for_dvc_or_the_pipeline(tmp_path):
    """Python writes __pycache__/*.pyc into a code folder on import: with the project's
    .dvcignore, DVC does not see a stage with that folder as a dep change, and path_md5 (the
    fingerprints and lineage) agrees with dvc.lock."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    dvc = str(Path(sys.executable).parent / "dvc")
    project = tmp_path / "project"
    code = project / "code"
    code.mkdir(parents=True)
    (code / "step.py").write_text("VALUE = 1\n")
    shutil.copy(repo / ".dvcignore", project / ".dvcignore")
    stage = {"cmd": "echo done > out.txt", "deps": ["code"], "outs": ["out.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"step": stage}}))
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "repro", "-q"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["step"]["deps"][0]
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "step.cpython-311.pyc").write_bytes(b"\x00bytecode")
    status = subprocess.run(
        [dvc, "status"], cwd=project, check=True, capture_output=True, text=True
    ).stdout
    assert "up to date" in status, status
    assert path_md5(code) == locked["md5"]
