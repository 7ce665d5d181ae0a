"""One measurement in a fresh process: `python -m benchmarks.worker STAGE IMPL WORKSPACE OUT`.

A fresh process per measurement gives each its own memory high-water mark. Peak memory is
the process's peak resident memory minus its resident memory after the imports (the same
libraries on both sides, plus TRL on TRL's), so it counts the weights, data, activations,
gradients and optimizer state of the run and not the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.flops import matmul_weights, mean_causal_context, training_flops_per_token
from benchmarks.hardware import configure_threads, current_rss_mb, peak_rss_mb
from benchmarks.meter import find_decoder
from benchmarks.workload import load_settings


def _runner(stage: str, impl: str):
    if impl == "ours":
        from benchmarks import ours, ppo

        runners = {
            "sft": ours.run_sft,
            "reward": ours.run_reward,
            "dpo": ours.run_dpo,
            "dpo_lora": ours.run_dpo_lora,
            "ppo": ppo.run_ppo,
        }
    elif impl == "trl":
        import trl  # noqa: F401  (imported before the memory baseline)

        from benchmarks import trl_runs

        runners = {
            "sft": trl_runs.run_sft,
            "reward": trl_runs.run_reward,
            "dpo": trl_runs.run_dpo,
            "dpo_lora": trl_runs.run_dpo_lora,
        }
    else:
        raise ValueError(f"impl must be ours or trl, not {impl!r}")
    if stage not in runners:
        raise ValueError(f"no {impl} runner for stage {stage!r}")
    return runners[stage]


def measure(stage: str, impl: str, workspace: Path) -> dict:
    """Run one stage with one implementation and return its measurement (JSON-ready)."""
    import datasets  # noqa: F401
    import transformers  # noqa: F401

    settings = load_settings(workspace)
    threads = configure_threads(settings.threads)
    runner = _runner(stage, impl)
    baseline_mb = current_rss_mb()
    result = runner(workspace, settings)
    peak_mb = peak_rss_mb()
    model = result.pop("model")
    decoder = find_decoder(model)
    record = {
        "stage": stage,
        "impl": impl,
        "threads": threads,
        "peak_mem_mb": peak_mb - baseline_mb,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
        "matmul_weights": matmul_weights(model),
    }
    meter = result.pop("meter", None)
    if meter is not None:
        context = mean_causal_context(meter.timed_row_lengths)
        record.update(
            tokens_per_s=meter.tokens_per_s(),
            timed_tokens=meter.timed_tokens,
            timed_seconds=meter.timed_seconds,
            step_seconds=meter.step_seconds,
            step_tokens=meter.step_tokens,
            mean_context=context,
            flops_per_token=training_flops_per_token(
                record["matmul_weights"],
                decoder.config.num_hidden_layers,
                decoder.config.hidden_size,
                context,
                trainable=matmul_weights(model, trainable_only=True),
            ),
        )
    record.update({k: v for k, v in result.items() if not k.startswith("_")})
    return record


def main(argv: list[str] | None = None) -> None:
    from rlhf_core.app.fast_exit import freeze_at_exit

    freeze_at_exit()  # the measurement is over when it exits: no second of teardown
    stage, impl, workspace, out = (argv or sys.argv[1:])[:4]
    record = measure(stage, impl, Path(workspace))
    Path(out).write_text(json.dumps(record, indent=2, default=float))


if __name__ == "__main__":
    main()
