"""The preference store versioned with `dvc add`: by `rlhf ingest` and the retrain flow
(`rlhf_core.orchestration.store_versioning.track_store`), seen by DVC as the validate stage's
dependency, shared with `dvc push` / `dvc pull`, and kept in git by the project's .gitignore.

Each test gets a small git + DVC project with the project's own .gitignore and one stage,
`validate`, that depends on data/preferences like the real one.
"""

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.data.store import read_table
from rlhf_core.orchestration.store_versioning import dvc_project_root, track_store
from rlhf_core.scripts import load_script
from rlhf_core.tracking.lineage import path_md5

REPO = Path(__file__).resolve().parents[1]
retrain_module = load_script(REPO / "flows" / "retrain.py")
runner = CliRunner()

VALIDATE_STAGE = {
    "stages": {
        "validate": {
            "cmd": "mkdir -p data/validated && ls -R data/preferences > data/validated/files.txt",
            "deps": ["data/preferences"],
            "outs": ["data/validated"],
        }
    }
}


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dvc_status(root: Path) -> dict:
    return json.loads(dvc(root, "status", "--json") or "{}")


@pytest.fixture
def project(tmp_path) -> Path:
    """A committed git + DVC project: the real .gitignore, the validate stage, an empty store
    (as `rlhf stage prepare` leaves it)."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@t")
    git(root, "config", "user.name", "t")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "dvc.yaml").write_text(yaml.safe_dump(VALIDATE_STAGE))
    (root / "data" / "preferences").mkdir(parents=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def write_pairs(path: Path, numbers) -> Path:
    rows = [
        {
            "prompt": f"Review film number {n}.",
            "chosen": f"Film {n} was wonderful.",
            "rejected": f"Film {n} was dull.",
        }
        for n in numbers
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ingest(store: Path, *args: str):
    params = store.parent / "no-params.yaml"  # absent: default validation settings
    return runner.invoke(app, ["ingest", *args, "--store", str(store), "--params", str(params)])


def tracked_md5(dvc_file: Path) -> str:
    [out] = yaml.safe_load(dvc_file.read_text())["outs"]
    return out["md5"]


def test_ingest_versions_the_store_with_dvc_add(project, tmp_path):
    store, dvc_file = project / "data" / "preferences", project / "data" / "preferences.dvc"
    batch = write_pairs(tmp_path / "batch1.jsonl", range(3))

    first = ingest(store, str(batch))
    assert first.exit_code == 0, first.output
    assert "tracked data/preferences" in first.output
    assert "`git add data/preferences.dvc` and `dvc push`" in first.output
    assert tracked_md5(dvc_file) == path_md5(store)
    assert not (project / "data" / ".gitignore").exists()  # .gitignore ignores the store already
    version = dvc_file.read_text()

    again = ingest(store, str(batch))
    assert again.exit_code == 0 and "already ingested" in again.output
    assert "data/preferences.dvc unchanged" in again.output
    assert dvc_file.read_text() == version

    more = ingest(store, str(write_pairs(tmp_path / "batch2.jsonl", range(3, 5))))
    assert more.exit_code == 0 and "tracked data/preferences" in more.output
    assert dvc_file.read_text() != version and tracked_md5(dvc_file) == path_md5(store)


def test_dvc_sees_the_tracked_store_as_the_validate_dependency(project, tmp_path):
    store = project / "data" / "preferences"
    assert ingest(store, str(write_pairs(tmp_path / "a.jsonl", range(3)))).exit_code == 0
    assert '"data/preferences.dvc" -> "validate"' in dvc(project, "dag", "--dot")
    dvc(project, "repro")
    assert dvc_status(project) == {}
    assert not retrain_module.store_changed_since_last_run(project, store)

    # Rows merged without `dvc add`: DVC sees both the stale .dvc file and validate's dep.
    untracked = ingest(store, "--no-dvc-add", str(write_pairs(tmp_path / "b.jsonl", range(3, 6))))
    assert untracked.exit_code == 0 and "dvc add" not in untracked.output
    assert set(dvc_status(project)) == {"data/preferences.dvc", "validate"}
    assert retrain_module.store_changed_since_last_run(project, store)

    assert track_store(store).changed
    changed = {"validate": [{"changed deps": {"data/preferences": "modified"}}]}
    assert dvc_status(project) == changed
    assert retrain_module.store_changed_since_last_run(project, store)
    dvc(project, "repro")
    assert dvc_status(project) == {}
    assert not retrain_module.store_changed_since_last_run(project, store)


def test_push_then_pull_in_a_clone_restores_the_store(project, tmp_path):
    store = project / "data" / "preferences"
    assert ingest(store, str(write_pairs(tmp_path / "a.jsonl", range(4)))).exit_code == 0
    dvc(project, "repro")
    dvc(project, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "store version")
    assert {"data/preferences.dvc", "dvc.lock"} <= set(git(project, "ls-files").split())
    dvc(project, "push")  # no target: DVC must find data/preferences.dvc on its own

    git(tmp_path, "clone", "-q", str(project), "clone")
    clone = tmp_path / "clone"
    assert not (clone / "data" / "preferences").exists()
    dvc(clone, "pull")
    pulled = clone / "data" / "preferences"
    for name in ("pairs.parquet", "manifest.jsonl"):
        assert (pulled / name).read_bytes() == (store / name).read_bytes()
    assert path_md5(pulled) == path_md5(store) and dvc_status(clone) == {}


def test_an_empty_store_can_be_tracked(project):
    store = project / "data" / "preferences"  # empty, as `rlhf stage prepare` makes it
    tracking = track_store(store)
    assert tracking.changed and tracking.dvc_file == project / "data" / "preferences.dvc"
    assert yaml.safe_load(tracking.dvc_file.read_text())["outs"][0]["nfiles"] == 0
    assert not track_store(store).changed


def test_the_store_is_never_linked_into_the_dvc_cache(project, tmp_path):
    # With hardlinks, appending to manifest.jsonl would rewrite the cached previous version.
    dvc(project, "config", "cache.type", "hardlink")
    store = project / "data" / "preferences"
    for n, name in enumerate(["a.jsonl", "b.jsonl"]):
        result = ingest(store, str(write_pairs(tmp_path / name, range(3 * n, 3 * n + 3))))
        assert result.exit_code == 0 and "tracked data/preferences" in result.output
    assert all(f.stat().st_nlink == 1 for f in store.rglob("*") if f.is_file())
    cached = [f for f in (project / ".dvc" / "cache").rglob("*") if f.is_file()]
    for file in cached:
        if not file.name.endswith(".dir"):
            assert hashlib.md5(file.read_bytes()).hexdigest() == file.parent.name + file.name


def test_no_dvc_project_skips_dvc_add_with_a_note(tmp_path):
    assert dvc_project_root(tmp_path / "store") is None
    store = tmp_path / "store"
    result = ingest(store, str(write_pairs(tmp_path / "a.jsonl", range(2))))
    assert result.exit_code == 0, result.output
    assert "is not inside a DVC project" in result.output and "not tracked" in result.output
    assert not (tmp_path / "store.dvc").exists() and len(read_table(store)) == 2


def test_no_dvc_add_leaves_the_store_untracked(project, tmp_path):
    store = project / "data" / "preferences"
    result = ingest(store, "--no-dvc-add", str(write_pairs(tmp_path / "a.jsonl", range(2))))
    assert result.exit_code == 0 and "dvc add" not in result.output
    assert not (project / "data" / "preferences.dvc").exists()


def test_a_dvc_failure_is_one_error_and_the_rows_stay_merged(project, tmp_path):
    (project / ".gitignore").write_text("/data/\n")  # the .dvc file would be git-ignored
    store = project / "data" / "preferences"
    result = ingest(store, str(write_pairs(tmp_path / "a.jsonl", range(3))))
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "`dvc add data/preferences` failed" in error and "is git-ignored" in error
    assert "`/data/?*` (not `/data/`) then `!/data/preferences.dvc`" in error
    assert "Traceback" not in result.output
    assert len(read_table(store)) == 3


def test_the_project_gitignore_keeps_the_dvc_file_and_ignores_the_data(tmp_path):
    git(tmp_path, "init", "-q")
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    files = ["data/preferences.dvc", "data/preferences/pairs.parquet", "data/raw/sft.jsonl"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()

    def ignored(name: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", name], cwd=tmp_path).returncode == 0

    assert not ignored("data/preferences.dvc")
    assert ignored("data/preferences/pairs.parquet") and ignored("data/raw/sft.jsonl")
    untracked = git(tmp_path, "status", "--porcelain", "-uall").split("\n")
    assert sorted(filter(None, untracked)) == ["?? .gitignore", "?? data/preferences.dvc"]


def test_the_retrain_flow_versions_the_store_after_ingesting(project, monkeypatch):
    store = project / "data" / "preferences"
    (project / "data" / "incoming").mkdir()
    write_pairs(project / "data" / "incoming" / "batch.jsonl", range(4))
    monkeypatch.setattr(retrain_module, "pipeline", lambda **_: {"gate": {"status": "skipped"}})
    result = retrain_module.retrain.fn(project_root=str(project))
    assert result["status"] == "retrained" and result["added"] == 4
    assert "tracked data/preferences" in result["store_tracking"]
    assert tracked_md5(project / "data" / "preferences.dvc") == path_md5(store)


def test_a_dvc_failure_in_the_retrain_flow_is_logged_and_the_retrain_goes_on(
    project, monkeypatch, caplog
):
    (project / ".gitignore").write_text("/data/\n")  # the .dvc file would be git-ignored
    (project / "data" / "incoming").mkdir()
    write_pairs(project / "data" / "incoming" / "batch.jsonl", range(4))
    monkeypatch.setattr(retrain_module, "pipeline", lambda **_: {"gate": {"status": "skipped"}})
    with caplog.at_level(logging.ERROR):
        result = retrain_module.retrain.fn(project_root=str(project))
    assert result["status"] == "retrained" and result["added"] == 4
    assert "`dvc add data/preferences` failed" in result["store_tracking"]
    assert [r.getMessage() for r in caplog.records] == [result["store_tracking"]]
    assert len(read_table(project / "data" / "preferences")) == 4


def test_the_retrain_holds_the_store_through_its_pipeline_and_finishes_a_cut_short_ingest(
    project, monkeypatch
):
    from rlhf_core.data.store import COMMIT_JOURNAL, ingest_files, read_manifest
    from rlhf_core.data.store_lock import store_lock_path

    store = project / "data" / "preferences"
    ingest_files([write_pairs(project / "one.jsonl", range(3))], store)
    # An ingest killed just after its commit point: the journal and the staged table are there.
    finished = project / "finished"
    shutil.copytree(store, finished)
    ingest_files([write_pairs(project / "two.jsonl", range(3, 6))], finished)
    staged = store / ".pairs.parquet.0123.tmp"
    shutil.copy2(finished / "pairs.parquet", staged)
    journal = {"table": "pairs.parquet", "staged": staged.name, "entry": read_manifest(finished)[1]}
    (store / COMMIT_JOURNAL).write_text(json.dumps(journal), encoding="utf-8")

    def try_lock_elsewhere() -> int:
        probe = "import sys, filelock; filelock.FileLock(sys.argv[1]).acquire(timeout=0)"
        lock = str(store_lock_path(store))
        return subprocess.run([sys.executable, "-c", probe, lock], capture_output=True).returncode

    seen = {}

    def pipeline(**_):
        seen["rows"] = len(read_table(store))
        seen["lock_elsewhere"] = try_lock_elsewhere()
        return {"gate": {"status": "skipped"}}

    monkeypatch.setattr(retrain_module, "pipeline", pipeline)
    result = retrain_module.retrain.fn(project_root=str(project))
    assert result["status"] == "retrained"
    assert seen == {"rows": 6, "lock_elsewhere": 1}  # the pipeline read the finished ingest
    assert not (store / COMMIT_JOURNAL).exists() and not staged.exists()
    assert [e["file"] for e in read_manifest(store)] == ["one.jsonl", "two.jsonl"]
    assert try_lock_elsewhere() == 0  # released at the end
