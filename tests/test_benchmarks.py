"""The benchmark harness: FLOP counts, the step meter, the results file and a quick full run."""

from __future__ import annotations

import json

import pytest
import torch
from forkservers import stop_forkserver
from tiny_models import two_layer_llama
from torch import nn
from transformers import LlamaForCausalLM

from benchmarks.flops import (
    forward_flops_per_token,
    matmul_weights,
    mean_causal_context,
    training_flops_per_token,
    utilisation,
)
from benchmarks.meter import StepMeter, find_decoder
from benchmarks.report import (
    README_BEGIN,
    README_END,
    REAL_README_BEGIN,
    REAL_README_END,
    evaluate_targets,
    markdown,
    update_readme,
)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return two_layer_llama(32, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------ FLOPs


def test_matmul_weights_counts_each_linear_once():
    shared = nn.Linear(4, 3, bias=True)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(3, 5), shared.__class__(4, 3))
    model[3].weight = shared.weight  # tied: counted once
    assert matmul_weights(model) == 4 * 3 + 3 * 5


def test_llama_matmul_weights_are_the_projections_and_the_head():
    model = _tiny_llama()
    per_layer = 4 * 16 * 16 + 3 * 16 * 32  # q, k, v, o + gate, up, down
    assert matmul_weights(model) == 2 * per_layer + 16 * 32  # + LM head (embeddings excluded)
    for module in model.model.layers[0].modules():
        module.requires_grad_(False)
    assert matmul_weights(model, trainable_only=True) == per_layer + 16 * 32


def test_causal_context_and_flops_by_hand():
    assert mean_causal_context([1]) == 1.0
    assert mean_causal_context([3]) == 2.0  # positions attend to 1, 2, 3
    assert mean_causal_context([1, 3]) == pytest.approx((1 + 6) / 4)
    assert forward_flops_per_token(100, 2, 8, 4.0) == 2 * 100 + 4 * 2 * 8 * 4
    assert training_flops_per_token(100, 2, 8, 4.0) == 3 * (200 + 256)
    # LoRA: the backward multiplies by every weight for input gradients (2 per weight) but
    # makes weight gradients for the 10 trainable ones only (2 per weight)
    assert training_flops_per_token(100, 2, 8, 4.0, trainable=10) == 4 * 100 + 2 * 10 + 3 * 256
    assert utilisation(2e9, 50.0, 200.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_causal_context([])
    with pytest.raises(ValueError):
        utilisation(1.0, 1.0, 0.0)


# ------------------------------------------------------------------------------------ meter


def test_meter_counts_real_tokens_of_training_forwards_only():
    model = _tiny_llama()
    meter = StepMeter(warmup_steps=1).attach(model)
    ids = torch.randint(0, 32, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    with torch.no_grad():  # a reference or evaluation pass: not training work
        model(input_ids=ids, attention_mask=mask)
    meter.end_step()
    model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids[:1])  # no mask (packed / padding-free rows): every position counts
    meter.end_step()
    meter.detach()
    model(input_ids=ids, attention_mask=mask)  # after detach: not counted

    assert meter.step_tokens == [5, 5 + 4]
    assert meter.step_rows == [[3, 2], [3, 2, 4]]
    assert meter.timed_tokens == 9
    assert meter.timed_row_lengths == [3, 2, 4]
    assert meter.tokens_per_s() == pytest.approx(9 / meter.step_seconds[1])


def test_meter_needs_a_timed_step_and_a_decoder():
    meter = StepMeter(warmup_steps=2)
    with pytest.raises(RuntimeError):
        meter.end_step()
    meter.start()
    meter.end_step()
    with pytest.raises(ValueError, match="none after 2 warm-up"):
        meter.tokens_per_s()
    with pytest.raises(ValueError, match="no decoder"):
        find_decoder(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ report


def _results(ratio_sft: float, overhead: float) -> dict:
    stage = {
        "ours_tokens_per_s": 150.0,
        "trl_tokens_per_s": 100.0,
        "ratio": 1.5,
        "utilisation": 0.55,
        "trl_utilisation": 0.4,
        "ours_peak_mem_mb": 900.0,
        "trl_peak_mem_mb": 1000.0,
        "memory_ratio": 0.9,
        "ours_final_loss": 1.0,
        "trl_final_loss": 1.01,
        "ours_mean_loss": 1.5,
        "trl_mean_loss": 1.6,
    }
    return {
        "created_at": "2026-11-22T00:00:00+00:00",
        "git_commit": "0123456789abcdef",
        "machine": {"cpu": "test cpu", "torch_threads": 2, "trl": "1.16.0"},
        "settings": {
            "model_config": "bench",
            "max_length": 256,
            "sft_batch_size": 8,
            "pair_batch_size": 4,
            "timed_steps": 4,
            "warmup_steps": 1,
        },
        "workload": {"parameters": 30e6, "model_vocab_size": 8192},
        "matmul_peak_gflops": 300.0,
        "stages": {
            "sft": {**stage, "ratio": ratio_sft},
            "reward": stage,
            "dpo": {**stage, "ratio": 2.5},
        },
        "pipeline": {
            "total_s": 100.0,
            "compute_s": 100.0 * (1 - overhead),
            "overhead_s": 100.0 * overhead,
            "overhead_fraction": overhead,
            "noop_flow_s": 2.0,
            "prefect_start_s": 3.0,
            "noop_dvc_repro_s": 1.0,
        },
    }


def test_targets_hold_or_not_by_the_numbers():
    checks = {c["target"]: c for c in evaluate_targets(_results(1.4, 0.2))}
    assert checks["sft ours/TRL tokens/s >= 1.5"]["met"] is False
    assert checks["reward ours/TRL tokens/s >= 1.5"]["met"] is True
    assert checks["dpo ours/TRL tokens/s >= 2.0"]["met"] is True
    assert checks["pipeline overhead fraction <= 0.1"]["met"] is False
    assert checks["no-op dvc repro (s) <= 3.0"]["value"] == 1.0
    passing = evaluate_targets(_results(1.6, 0.05))
    assert all(check["met"] for check in passing)
    without_pipeline = _results(1.6, 0.05)
    del without_pipeline["pipeline"]
    unmeasured = [c for c in evaluate_targets(without_pipeline) if c["met"] is None]
    assert len(unmeasured) == 3


def test_markdown_table_and_readme_section(tmp_path):
    results = _results(1.4, 0.2)
    results["targets"] = evaluate_targets(results)
    table = markdown(results)
    assert (
        "| sft | 150 | 100 | 1.40× | 55% / 40% | 900 / 1,000 | 1.000 / 1.010 | 1.500 / 1.600 |"
        in table
    )
    assert "| sft ours/TRL tokens/s >= 1.5 | 1.4 | **no** |" in table
    assert "| `rlhf run` from scratch, wall | 100.0 |" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n")
    assert update_readme(readme, table)
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not update_readme(plain, table)
    assert plain.read_text() == "no markers\n"


def test_a_real_model_run_has_its_own_title_section_and_no_pipeline_rows(tmp_path):
    results = _results(1.4, 0.2)
    del results["pipeline"]
    results["settings"]["base_model"] = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    results["targets"] = evaluate_targets(results)
    table = markdown(results)
    assert table.startswith("Measured by `make bench-real`")
    assert "Model `SmolLM2-135M-Instruct.Q4_1.gguf`" in table
    assert "pipeline" not in table and "not measured" not in table
    readme = tmp_path / "README.md"
    readme.write_text(
        f"{README_BEGIN}\ndemo\n{README_END}\n"
        f"{REAL_README_BEGIN}\nprevious figures\n{REAL_README_END}\n"
    )
    assert update_readme(readme, table, REAL_README_BEGIN, REAL_README_END)
    text = readme.read_text()
    assert "demo" in text and "previous figures" not in text and table in text


# ------------------------------------------------------------------------------------ a run


@pytest.fixture(scope="module")
def bench_forkserver():
    """The workers' fork server with its own preloads (benchmarks.run), started once for the
    module's measurements: one another test file started in this worker is stopped first."""
    stop_forkserver()


@pytest.mark.slow
def test_a_failed_measurement_names_itself_and_shows_its_log(tmp_path, bench_forkserver):
    """A measurement runs in a process forked from the workers' fork server; its failure is
    an error with the process's exit code and the end of its log."""
    from benchmarks.run import run_worker

    logs = tmp_path / "logs"
    logs.mkdir()
    # an empty workspace: the worker finds no workload.json
    with pytest.raises(RuntimeError, match=r"(?s)ours sft failed \(exit 1.*workload\.json"):
        run_worker("sft", "ours", tmp_path, logs)
    assert "FileNotFoundError" in (logs / "sft_ours.log").read_text()


@pytest.mark.slow
def test_quick_run_measures_every_stage(tmp_path, bench_forkserver):
    """The pipeline measurement (`benchmarks.pipeline`) is tested in
    tests/test_pipeline_end_to_end.py, on the project whose first run it measures."""
    from benchmarks.run import run_benchmarks
    from benchmarks.settings import QUICK

    results = run_benchmarks(QUICK, tmp_path, with_trl=True, with_pipeline=False)

    written = json.loads((tmp_path / "latest.json").read_text())
    assert written["matmul_peak_gflops"] == results["matmul_peak_gflops"] > 0
    for stage in ("sft", "reward", "dpo", "dpo_lora"):
        row = written["stages"][stage]
        assert row["ours_tokens_per_s"] > 0 and row["trl_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["trl_tokens_per_s"])
        assert row["ours_peak_mem_mb"] > 0 and row["trl_peak_mem_mb"] > 0
        assert 0 < row["utilisation"] < 1.5
        # The meter's count equals the loop's own count of real tokens, step by step.
        assert row["ours"]["step_tokens"] == row["ours"]["loop_step_tokens"]
        assert len(row["ours"]["step_seconds"]) == QUICK.total_steps
    assert written["stages"]["sft"]["trl"]["step_tokens"][-1] > 0
    # LoRA trains a few weights on both sides, and FLOPs count input gradients only elsewhere
    for impl in ("ours", "trl"):
        full, lora = written["stages"]["dpo"][impl], written["stages"]["dpo_lora"][impl]
        assert lora["flops_per_token"] < full["flops_per_token"]
    ppo = written["stages"]["ppo"]
    assert ppo["trl_tokens_per_s"] is None and "no PPO trainer" in ppo["trl_note"]
    assert sum(ppo["time_split_fraction"].values()) == pytest.approx(1.0, abs=0.05)
    assert ppo["generation"]["plain_generate_tokens_per_s"] > 0
    assert "pipeline" not in written
    from benchmarks.report import TARGETS

    for (_, path, _, _), check in zip(TARGETS, written["targets"], strict=True):
        # the pipeline's targets are not measured here
        assert check["met"] in ((None,) if path[0] == "pipeline" else (True, False))
    assert "| sft |" in (tmp_path / "latest.md").read_text()
    assert "| dpo_lora |" in (tmp_path / "latest.md").read_text()


def test_workspace_of_a_pretrained_model_uses_its_weights_and_tokenizer(tmp_path):
    """`--real`: the shared starting point is the given model, not a from-scratch one."""
    import dataclasses

    from safetensors.torch import load_file

    from benchmarks.settings import QUICK
    from benchmarks.workload import base_dir, build_workspace

    scratch = build_workspace(QUICK, tmp_path / "scratch")
    pretrained = dataclasses.replace(QUICK, base_model=str(base_dir(tmp_path / "scratch")))
    real = build_workspace(pretrained, tmp_path / "real")
    assert real["parameters"] == scratch["parameters"]
    assert real["tokenizer_size"] == scratch["tokenizer_size"]
    assert real["settings"]["base_model"] == pretrained.base_model
    original = load_file(base_dir(tmp_path / "scratch") / "model.safetensors")
    copied = load_file(base_dir(tmp_path / "real") / "model.safetensors")
    assert original.keys() == copied.keys()
    assert all(torch.equal(original[name], copied[name]) for name in original)
