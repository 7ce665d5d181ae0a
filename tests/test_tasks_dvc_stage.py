"""tasks/dvc_stage.py on the toy git + DVC repository of tests/toy_project.py."""

import pickle
import sys
from pathlib import Path

import pytest
from toy_project import TOY_ORDER, calls, set_param

from rlhf_core.scripts import load_script
from rlhf_core.tracking.lineage import path_md5, read_producer_run_id

dvc_stage = load_script(Path(__file__).resolve().parents[1] / "tasks" / "dvc_stage.py")


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
