"""tasks/dvc_stage.py on a toy git + DVC repository whose stages are quick Python scripts.

The toy DAG (written to dvc.yaml in reverse order, so only the DAG can put it right):
    first (params: seed; deps: data/preferences; MLflow run; metrics/first.json)
    -> second@x, second@y (foreach; params: data.split_salt; no cache:false outs, so DVC's
       run-cache can restore them) -> third (MLflow run)
Each call of a stage appends its name to calls.log, so tests can see what really ran.
"""

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.scripts import load_script
from rlhf_core.tracking.lineage import path_md5, read_producer_run_id

dvc_stage = load_script(Path(__file__).resolve().parents[1] / "tasks" / "dvc_stage.py")

TOY_STAGE = '''"""Toy stage: <name> <out dir> [--mlflow]; see tests/test_tasks_dvc_stage.py."""
import json
import sys
from pathlib import Path

import yaml

name, out = sys.argv[1], Path(sys.argv[2])
with open("calls.log", "a") as calls:
    calls.write(name + "\\n")
if Path(f"broken_{name}").exists():
    print("ValueError: this stage is broken on purpose")
    sys.exit(1)
if Path(f"flaky_{name}").exists():
    Path(f"flaky_{name}").unlink()  # fails once, like a DVC lock held by another process
    print("ERROR: Unable to acquire lock. Most likely another DVC process is running")
    sys.exit(1)
params = yaml.safe_load(Path("params.yaml").read_text())
value = {
    "first": f"seed={params['seed']}",
    "third": "third",
}.get(name, f"salt={params['data']['split_salt']}")


def write():
    out.mkdir(parents=True, exist_ok=True)
    (out / "value.txt").write_text(value)
    Path("metrics").mkdir(exist_ok=True)
    metrics = {"loss": 0.25 + params["seed"], "seconds": 0.1, "eval": {"accuracy": 0.75}}
    Path(f"metrics/{name}.json").write_text(json.dumps(metrics))


if "--mlflow" in sys.argv:
    from rlhf_core.tracking.runs import stage_run

    with stage_run(name, params=params) as run:
        write()
        run.log_metrics({"loss": 0.5}, step=0)
        run.record_output(out)
else:
    write()
print(f"{name} wrote {out}")
'''

TOY_DVC_YAML = {
    "stages": {
        "third": {
            "cmd": "python toy_stage.py third out/third --mlflow",
            "deps": ["toy_stage.py", "out/second"],
            "outs": ["out/third"],
        },
        "second": {
            "foreach": ["x", "y"],
            "do": {
                "cmd": "python toy_stage.py second_${item} out/second/${item}",
                "deps": ["toy_stage.py", "out/first"],
                "params": ["data.split_salt"],
                "outs": ["out/second/${item}"],
            },
        },
        "first": {
            "cmd": "python toy_stage.py first out/first --mlflow",
            "deps": ["toy_stage.py", "data/preferences"],
            "params": ["seed"],
            "outs": ["out/first"],
            "metrics": [{"metrics/first.json": {"cache": False}}],
        },
    }
}
TOY_PARAMS = {"seed": 0, "data": {"split_salt": ""}}
TOY_ORDER = ["first", "second@x", "second@y", "third"]


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def init_repo(root: Path, files: dict[str, str]) -> Path:
    """A committed git + DVC repo holding `files`, data/ folders, and a migrated MLflow store."""
    from mlflow import MlflowClient

    root.mkdir(parents=True)
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    files = {".gitignore": "mlflow.db\nmlruns/\ncalls.log\n.prefect/\n/data/\n", **files}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "data" / "preferences").mkdir(parents=True)
    (root / "data" / "incoming").mkdir()
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "toy pipeline"], cwd=root, check=True)
    MlflowClient(f"sqlite:///{root}/mlflow.db").search_experiments()  # migrate once
    return root


def build_toy_project(root: Path) -> Path:
    """The toy pipeline of this module's docstring, plus a file tracked with `dvc add`."""
    init_repo(
        root,
        {
            "toy_stage.py": TOY_STAGE,
            "dvc.yaml": yaml.safe_dump(TOY_DVC_YAML, sort_keys=False),
            "params.yaml": yaml.safe_dump(TOY_PARAMS),
        },
    )
    (root / "notes.txt").write_text("data tracked with dvc add, not a stage\n")
    dvc(root, "add", "-q", "notes.txt")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "notes"], cwd=root, check=True)
    return root


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().split() if log.is_file() else []


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    section = params
    for key in parents:
        section = section[key]
    section[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def toy_template(tmp_path_factory) -> Path:
    return build_toy_project(tmp_path_factory.mktemp("toy") / "template")


@pytest.fixture
def toy(toy_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the toy project; MLflow settings from the environment cleared."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_PARENT_RUN_ID", "RLHF_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    return Path(shutil.copytree(toy_template, tmp_path / "toy", symlinks=True))


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def test_parse_dot_reads_quoted_nodes_and_edges():
    dot = 'strict digraph {\n"a";\n"b@x";\n"c.dvc";\n"a" -> "b@x";\n"c.dvc" -> "a";\n}\n'
    nodes, edges = dvc_stage.parse_dot(dot)
    assert nodes == ["a", "b@x", "c.dvc"]
    assert edges == [("a", "b@x"), ("c.dvc", "a")]


def test_topological_order_puts_dependencies_first_then_ranks():
    edges = [("prep", "train@b"), ("prep", "train@a"), ("train@a", "eval"), ("train@b", "eval")]
    rank = {"eval": 0, "train@a": 1, "train@b": 1, "prep": 2}
    order = dvc_stage.topological_order(["eval", "train@b", "train@a", "prep"], edges, rank)
    assert order == ["prep", "train@a", "train@b", "eval"]
    with pytest.raises(ValueError, match="cycle"):
        dvc_stage.topological_order(["a", "b"], [("a", "b"), ("b", "a")], {})


def test_repro_outcome_tells_ran_restored_and_skipped_apart():
    assert dvc_stage.repro_outcome("s", ["Running stage 's':", "> cmd"]) == dvc_stage.RAN
    restored = ["Stage 's' is cached - skipping run, checking out outputs"]
    assert dvc_stage.repro_outcome("s", restored) == dvc_stage.RESTORED
    assert dvc_stage.repro_outcome("s", ["Stage 's' didn't change, skipping"]) == "skipped"
    assert dvc_stage.repro_outcome("s", ["Running stage 'other':"]) is None


def test_only_transient_errors_are_retried():
    from prefect.states import Failed

    locked = dvc_stage.DvcCommandError(["repro", "s"], 255, ["ERROR: Unable to acquire lock."])
    broken = dvc_stage.DvcCommandError(["repro", "s"], 1, ["ValueError: bad data"])
    assert locked.transient and not broken.transient
    assert "`dvc repro s` failed with exit code 1: ValueError: bad data" in str(broken)
    copy = pickle.loads(pickle.dumps(locked))  # Prefect may pickle a failed task's error
    assert copy.transient and str(copy) == str(locked)
    assert dvc_stage.is_transient(BlockingIOError("EAGAIN"))
    assert not dvc_stage.is_transient(FileNotFoundError("dvc"))
    assert not dvc_stage.is_transient(ValueError("bad params"))
    assert dvc_stage.retry_on_transient(None, None, Failed(data=locked))
    assert not dvc_stage.retry_on_transient(None, None, Failed(data=broken))


def test_stage_environment_sets_or_clears_the_parent_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", "stale")
    assert dvc_stage.stage_environment("abc")["MLFLOW_PARENT_RUN_ID"] == "abc"
    env = dvc_stage.stage_environment(None)
    assert "MLFLOW_PARENT_RUN_ID" not in env
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


# --------------------------------------------------------------------------------------------
# On the toy repository (run_stage called as a plain function: no Prefect API needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stage_order_comes_from_the_dag_with_foreach_stages(toy):
    assert dvc_stage.stage_order(toy) == TOY_ORDER  # notes.txt.dvc is data, not a stage


@pytest.mark.slow
def test_run_stage_runs_a_stale_stage_then_skips_it(toy):
    from mlflow import MlflowClient

    first = dvc_stage.run_stage.fn("first", str(toy))
    assert first["status"] == "ran" and first["reasons"]
    assert first["outputs"] == {
        "metrics/first.json": path_md5(toy / "metrics" / "first.json"),
        "out/first": path_md5(toy / "out" / "first"),
    }
    assert first["run_id"] == read_producer_run_id(toy / "out" / "first")
    run = MlflowClient(f"sqlite:///{toy}/mlflow.db").get_run(first["run_id"])
    assert run.data.tags["stage"] == "first" and "mlflow.parentRunId" not in run.data.tags

    again = dvc_stage.run_stage.fn("first", str(toy))
    assert again["status"] == "skipped" and again["reasons"] == []
    assert again["outputs"] == first["outputs"] and again["run_id"] == first["run_id"]
    assert calls(toy) == ["first"]


@pytest.mark.slow
def test_a_param_change_makes_the_stage_stale_and_dvc_run_cache_restores(toy):
    dvc_stage.run_stage.fn("first", str(toy))
    assert dvc_stage.run_stage.fn("second@x", str(toy))["status"] == "ran"
    set_param(toy, "data.split_salt", "v2")
    assert dvc_stage.stale_reasons(toy, "first") == []
    assert any("params.yaml" in reason for reason in dvc_stage.stale_reasons(toy, "second@x"))
    changed = dvc_stage.run_stage.fn("second@x", str(toy))
    assert changed["status"] == "ran" and (toy / "out/second/x/value.txt").read_text() == "salt=v2"
    set_param(toy, "data.split_salt", "")
    restored = dvc_stage.run_stage.fn("second@x", str(toy))
    assert restored["status"] == "restored"  # outputs came back from DVC's run-cache
    assert (toy / "out/second/x/value.txt").read_text() == "salt="
    assert calls(toy) == ["first", "second_x", "second_x"]


@pytest.mark.slow
def test_a_failing_stage_raises_a_permanent_error(toy):
    (toy / "broken_first").touch()
    with pytest.raises(dvc_stage.DvcCommandError) as failure:
        dvc_stage.run_stage.fn("first", str(toy))
    assert not failure.value.transient
    message = str(failure.value)  # DVC's error, then the stage's own last line
    assert "exited with 1" in message
    assert "(last output: ValueError: this stage is broken on purpose)" in message


@pytest.mark.slow
def test_a_held_dvc_lock_is_a_transient_error(toy):
    import zc.lockfile

    held = zc.lockfile.LockFile(str(toy / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(dvc_stage.DvcCommandError) as failure:
            dvc_stage.run_stage.fn("first", str(toy))
    finally:
        held.close()
    assert failure.value.transient and dvc_stage.is_transient(failure.value)
    assert calls(toy) == []
