"""PPO on two real processes: `accelerate launch` (DDP over gloo on CPUs) runs
tests/ppo_process_worker.py once, and the tests here compare what each process wrote with
the single-process results. A launch that hangs fails the tests after `LAUNCH_TIMEOUT_S`.
The launch (two interpreters importing torch, then every check) takes 25-45 s on two cores,
so the tests that read it are marked slow; the pure ones are not."""

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from ppo_process_worker import TRAIN_CASES, UPDATE_CASES, UPDATE_ROWS, new_policy, settings
from safetensors.torch import load_file
from tiny_models import word_tokenizer

from rlhf_core.algorithms.ppo import whiten
from rlhf_core.generation import derived_seed
from rlhf_core.training.ppo_trainer import rollout_seed, rollout_shard

WORKER = Path(__file__).with_name("ppo_process_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCH_TIMEOUT_S = 240
# fp32, one update of 5 (or 10) SGD steps: what reordered float sums can leave behind.
WEIGHT_TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The folder the worker's two processes wrote into (one launch for the whole file)."""
    out = tmp_path_factory.mktemp("ppo_processes")
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(WORKER), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        cwd=Path(__file__).parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the launcher and both workers can be killed as one group
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process PPO run hung for {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    assert (out / "done-rank0").exists() and (out / "done-rank1").exists(), output[-4000:]
    return out


def read(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]


def weights(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / f"{name}-rank{rank}.safetensors")) for rank in (0, 1)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def without_timings(rows: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}
        for row in rows
    ]


@pytest.fixture(scope="module")
def initial_weights() -> dict[str, torch.Tensor]:
    policy = new_policy(word_tokenizer())
    return {name: p.detach().clone() for name, p in policy.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Sharding and seeds (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompts", "group_size", "world"), [(5, 1, 2), (3, 2, 2), (7, 4, 3)])
def test_rollout_shards_cover_every_row_once_and_keep_groups_whole(prompts, group_size, world):
    shards = [rollout_shard(prompts, group_size, rank, world) for rank in range(world)]
    assert sorted(row for rows in shards for row in rows) == list(range(prompts * group_size))
    for rows in shards:
        groups = {row // group_size for row in rows}
        assert len(rows) == len(groups) * group_size  # no group is split
    sizes = [len(rows) // group_size for rows in shards]
    assert max(sizes) - min(sizes) <= 1
    assert rollout_shard(prompts, group_size, 0, 1) == list(range(prompts * group_size))


def test_rollout_seeds_differ_per_process_and_process_0_keeps_the_single_process_seed():
    seeds = {rollout_seed(3, iteration, rank) for iteration in range(4) for rank in range(4)}
    assert len(seeds) == 16
    assert rollout_seed(3, 2, 0) == derived_seed(3, "rollout", 2)


# ---------------------------------------------------------------------------------------------
# Whitening over processes
# ---------------------------------------------------------------------------------------------


def test_whitening_shards_in_lockstep_equals_whitening_their_union():
    """Three threads stand in for three processes: the reducer sums what all three pass."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(9, 7, generator=generator) * 4 - 2  # (rows, tokens)
    mask = (torch.rand(9, 7, generator=generator) > 0.4).long()
    values[mask == 0] = float("nan")  # masked-out junk never reaches a result
    shards = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    barrier = threading.Barrier(len(shards))
    posted: dict[int, list[float]] = {}
    lock = threading.Lock()

    def reducer(rank: int):
        def reduce_sums(sums: list[float]) -> list[float]:
            with lock:
                posted[rank] = list(sums)
            barrier.wait()
            total = [math.fsum(column) for column in zip(*posted.values(), strict=True)]
            barrier.wait()  # nobody overwrites `posted` before every thread has summed it
            return total

        return reduce_sums

    results: dict[int, torch.Tensor] = {}

    def run(rank: int) -> None:
        rows = shards[rank]
        results[rank] = whiten(values[rows], mask[rows], reduce_sums=reducer(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    union = torch.cat([results[rank] for rank in range(len(shards))])
    expected = whiten(values, mask)
    torch.testing.assert_close(union, expected, rtol=0, atol=1e-6)
    assert float(union[mask.bool()].abs().max()) > 0.5  # a real spread, not all zeros


@pytest.mark.slow
def test_whitening_on_two_processes_equals_whitening_the_union(launched):
    shards = read(launched, "whiten")
    values, mask = torch.tensor(shards[0]["values"]), torch.tensor(shards[0]["mask"])
    assert [shard["rows"] for shard in shards] == [UPDATE_ROWS[0], UPDATE_ROWS[1]]
    union = torch.cat([torch.tensor(shard["out"]) for shard in shards])
    torch.testing.assert_close(union, whiten(values, mask), rtol=0, atol=1e-6)
    # Whitening each shard on its own would give another result: the check can fail.
    alone = torch.cat([whiten(values[rows], mask[rows]) for rows in UPDATE_ROWS.values()])
    assert float((alone - union).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------
# The update under DDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UPDATE_CASES))
def test_update_on_two_processes_equals_one_process_on_the_whole_experience(
    launched, initial_weights, case
):
    """5 rows split 3 + 2; `accumulate`: micro-batches of 1 row (3 on one process, 2 and a
    zero-weight pass on the other); `one-row`: minibatches of 1 row, so in each one process
    has no row and joins with a zero-weight pass."""
    ranks = weights(launched, f"update-{case}")
    single = load_file(str(launched / f"update-{case}-single.safetensors"))
    records = read(launched, f"update-{case}")
    assert records[0]["input_ids_sum"] == records[1]["input_ids_sum"]  # one experience
    assert max_difference(ranks[0], ranks[1]) == 0.0  # DDP keeps the replicas identical
    assert max_difference(ranks[0], single) <= WEIGHT_TOLERANCE
    assert max_difference(single, initial_weights) > 1e-3  # the update moved the weights
    single_metrics = json.loads((launched / f"update-{case}-single.json").read_text())
    for rank in (0, 1):
        assert records[rank]["metrics"] == pytest.approx(single_metrics, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_a_nan_loss_on_one_process_stops_every_process_before_the_update(launched):
    main, other = read(launched, "nan")
    # The process with the NaN names its first row of the minibatch (it holds rows 3 and 4).
    assert re.match(r"ppo update \(rollout rows [34]\): the loss is nan\. ", other["error"])
    assert main["error"].startswith("ppo update (rollout rows of another process): the loss is nan")
    assert main["weights_unchanged"] and other["weights_unchanged"]


@pytest.mark.slow
def test_fewer_prompts_than_processes_is_a_clear_error_on_every_process(launched):
    for record in read(launched, "too-few-prompts"):
        assert "1 prompts per iteration but runs on 2 processes" in record["error"]


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(TRAIN_CASES))
def test_training_on_two_processes_logs_global_metrics_and_ends_with_one_model(
    launched, initial_weights, estimator
):
    main, other = read(launched, f"train-{estimator}")
    final = weights(launched, f"train-{estimator}")
    assert max_difference(final[0], final[1]) == 0.0
    assert max_difference(final[0], initial_weights) > 1e-3
    assert without_timings(main["history"]) == without_timings(other["history"])
    run_settings = settings(**TRAIN_CASES[estimator])
    group_size = run_settings.group_size if run_settings.uses_groups else 1
    history = main["history"]
    assert len(history) == 3
    for iteration, row in enumerate(history):
        mine, theirs = main["rollouts"][iteration], other["rollouts"][iteration]
        # The shards differ in size (3 + 2 prompts, or 2 + 1 groups of 2).
        assert len(mine["scores"]) == len(theirs["scores"]) + group_size
        scores = mine["scores"] + theirs["scores"]
        lengths = mine["lengths"] + theirs["lengths"]
        ended = mine["ended"] + theirs["ended"]
        assert len(scores) == run_settings.rollout_batch_size
        assert row["reward/score_mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
        assert row["response/length_mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert row["response/ended_fraction"] == pytest.approx(sum(ended) / len(ended))
    # The KL controller is fed the global mean KL (Ziegler et al.'s rule, n = rollout rows).
    for before, after in itertools.pairwise(history):
        error = min(max(before["kl/mean"] / run_settings.target_kl - 1.0, -0.2), 0.2)
        factor = 1 + error * run_settings.rollout_batch_size / run_settings.kl_horizon
        assert after["kl/coef"] == pytest.approx(before["kl/coef"] * factor, rel=1e-9)
    # Only the main process logs and evaluates.
    assert main["logged"] == [1, 2, 3] and other["logged"] == []
    assert main["evaluated"] == [0, 3] and other["evaluated"] == []
    assert [row["step"] for row in main["eval_history"]] == [0, 3] and other["eval_history"] == []
    assert main["value_head_trainable"] and other["value_head_trainable"]
    if run_settings.uses_groups:
        head = [name for name in initial_weights if name.startswith("value_head.")]
        assert head and all(torch.equal(final[0][n], initial_weights[n]) for n in head)


@pytest.mark.slow
def test_a_two_process_run_resumed_from_its_checkpoint_reproduces_the_uninterrupted_one(
    launched,
):
    resumed = read(launched, "resume-gae")
    uninterrupted = read(launched, "train-gae")[0]
    assert [record["resumed_from"] for record in resumed] == [2, 2]
    assert sorted(p.name for p in (launched / "checkpoints-gae").iterdir()) == ["step-00000002"]
    final = weights(launched, "resume-gae")
    uninterrupted_weights = weights(launched, "train-gae")[0]
    assert max_difference(final[0], uninterrupted_weights) == 0.0
    assert max_difference(final[1], uninterrupted_weights) == 0.0
    assert without_timings(resumed[0]["history"]) == without_timings(uninterrupted["history"])
