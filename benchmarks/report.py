"""Results: the JSON record of a run, its targets, the markdown table and the README section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
# The real-model run (`make bench-real`) has a section of its own.
REAL_README_BEGIN = "<!-- bench-real:begin -->"
REAL_README_END = "<!-- bench-real:end -->"

# (name, where in the results, comparison, threshold)
TARGETS = (
    ("sft ours/TRL tokens/s", ("stages", "sft", "ratio"), ">=", 1.5),
    ("reward ours/TRL tokens/s", ("stages", "reward", "ratio"), ">=", 1.5),
    ("dpo ours/TRL tokens/s", ("stages", "dpo", "ratio"), ">=", 2.0),
    ("sft peak memory ours/TRL", ("stages", "sft", "memory_ratio"), "<=", 1.0),
    ("reward peak memory ours/TRL", ("stages", "reward", "memory_ratio"), "<=", 1.0),
    ("dpo peak memory ours/TRL", ("stages", "dpo", "memory_ratio"), "<=", 1.0),
    ("sft utilisation", ("stages", "sft", "utilisation"), ">=", 0.5),
    ("reward utilisation", ("stages", "reward", "utilisation"), ">=", 0.5),
    ("dpo utilisation", ("stages", "dpo", "utilisation"), ">=", 0.5),
    ("pipeline overhead fraction", ("pipeline", "overhead_fraction"), "<=", 0.10),
    ("no-op flow beyond Prefect start (s)", ("pipeline", "noop_flow_s"), "<=", 5.0),
    ("no-op dvc repro (s)", ("pipeline", "noop_dvc_repro_s"), "<=", 3.0),
)


PIPELINE_TARGETS = {
    f"{name} {comparison} {threshold}"
    for name, path, comparison, threshold in TARGETS
    if path[0] == "pipeline"
}


def _lookup(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it holds (None: not measured)."""
    checks = []
    for name, path, comparison, threshold in TARGETS:
        value = _lookup(results, path)
        met = None
        if value is not None:
            met = value >= threshold if comparison == ">=" else value <= threshold
        checks.append({"target": f"{name} {comparison} {threshold}", "value": value, "met": met})
    return checks


def stage_summary(ours: dict[str, Any], trl: dict[str, Any] | None, peak: float) -> dict:
    """The comparison fields of one training stage (see the results schema in README.md)."""
    from benchmarks.flops import utilisation

    summary: dict[str, Any] = {
        "ours_tokens_per_s": ours["tokens_per_s"],
        "trl_tokens_per_s": None,
        "ratio": None,
        "utilisation": utilisation(ours["flops_per_token"], ours["tokens_per_s"], peak),
        "trl_utilisation": None,
        "ours_peak_mem_mb": ours["peak_mem_mb"],
        "trl_peak_mem_mb": None,
        "memory_ratio": None,
        "ours_final_loss": ours["final_loss"],
        "trl_final_loss": None,
        "ours_mean_loss": ours["mean_loss"],
        "trl_mean_loss": None,
    }
    if trl is not None:
        summary.update(
            trl_tokens_per_s=trl["tokens_per_s"],
            ratio=ours["tokens_per_s"] / trl["tokens_per_s"],
            trl_utilisation=utilisation(trl["flops_per_token"], trl["tokens_per_s"], peak),
            trl_peak_mem_mb=trl["peak_mem_mb"],
            memory_ratio=ours["peak_mem_mb"] / trl["peak_mem_mb"],
            trl_final_loss=trl["final_loss"],
            trl_mean_loss=trl["mean_loss"],
        )
    summary["ours"] = ours
    summary["trl"] = trl
    return summary


def _number(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _percent(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (what README.md shows between the bench markers)."""
    settings = results["settings"]
    workload = results.get("workload", {})
    model_name = Path(settings["base_model"]).name if settings.get("base_model") else None
    lines = [
        f"Measured by `make {'bench-real' if model_name else 'bench'}` on "
        f"{results['created_at']} (commit "
        f"`{results['git_commit'][:10]}`), {results['machine']['cpu']}, "
        f"{results['machine']['torch_threads']} torch threads, fp32 matmul peak "
        f"**{results['matmul_peak_gflops']:.0f} GFLOP/s**. Model "
        f"`{model_name or settings['model_config']}` "
        f"({workload.get('parameters', 0) / 1e6:.1f}M parameters, vocabulary "
        f"{workload.get('model_vocab_size', '?')}), sequences up to {settings['max_length']} "
        f"tokens, {settings['sft_batch_size']} SFT examples or {settings['pair_batch_size']} "
        f"pairs per step, {settings['timed_steps']} timed steps after "
        f"{settings['warmup_steps']} warm-up; TRL {results['machine'].get('trl') or 'absent'}.",
        "",
        "| stage | ours tokens/s | TRL tokens/s | ours/TRL | utilisation (ours / TRL) "
        "| peak MB (ours / TRL) | final loss (ours / TRL) | mean loss over steps (ours / TRL) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage in ("sft", "reward", "dpo", "dpo_lora"):
        row = results["stages"].get(stage)
        if row is None:
            continue
        lines.append(
            f"| {stage} | {_number(row['ours_tokens_per_s'])} "
            f"| {_number(row['trl_tokens_per_s'])} | {_number(row['ratio'], 2, '×')} "
            f"| {_percent(row['utilisation'])} / {_percent(row['trl_utilisation'])} "
            f"| {_number(row['ours_peak_mem_mb'])} / {_number(row['trl_peak_mem_mb'])} "
            f"| {_number(row['ours_final_loss'], 3)} / {_number(row['trl_final_loss'], 3)} "
            f"| {_number(row.get('ours_mean_loss'), 3)} / {_number(row.get('trl_mean_loss'), 3)} |"
        )
    ppo = results["stages"].get("ppo")
    if ppo is not None:
        split = ppo["time_split_fraction"]
        generation = ppo["generation"]
        lines += [
            f"| ppo | {_number(ppo['ours_tokens_per_s'])} | — | — "
            f"| {_percent(ppo['utilisation'])} / — | {_number(ppo['ours_peak_mem_mb'])} / — "
            f"| {_number(ppo['ours_final_loss'], 3)} / — | — |",
            "",
            f"PPO: {ppo['trl_note']} An iteration's time: generation "
            f"{_percent(split['generation'])}, scoring {_percent(split['scoring'])}, "
            f"update {_percent(split['update'])}. "
            f"Generation {_number(generation['ours_tokens_per_s'])} tokens/s against "
            f"{_number(generation['plain_generate_tokens_per_s'])} for a plain "
            f"`model.generate` with the KV cache ({_number(generation['ratio'], 2, '×')}).",
        ]
    pipeline = results.get("pipeline")
    if pipeline:
        lines += [
            "",
            "| demo pipeline | seconds |",
            "| --- | ---: |",
            f"| `rlhf run` from scratch, wall | {pipeline['total_s']:.1f} |",
            f"| of which the stages' own compute | {pipeline['compute_s']:.1f} |",
            "| overhead (start-up, imports, tracking, DVC, Prefect) "
            f"| {pipeline['overhead_s']:.1f} ({_percent(pipeline['overhead_fraction'])}) |",
            f"| up-to-date `rlhf run`, beyond Prefect's start | {pipeline['noop_flow_s']:.1f} |",
            f"| Prefect's own start-up (reported separately) | {pipeline['prefect_start_s']:.1f} |",
            f"| `dvc repro` with nothing to do | {pipeline['noop_dvc_repro_s']:.1f} |",
        ]
    lines += ["", "| target | measured | holds |", "| --- | ---: | :---: |"]
    for check in results["targets"]:
        if pipeline is None and check["target"] in PIPELINE_TARGETS:
            continue  # the pipeline is measured on the demo only
        value = check["value"]
        shown = "—" if value is None else f"{value:.3g}"
        holds = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['target']} | {shown} | {holds} |")
    return "\n".join(lines) + "\n"


def update_readme(
    readme: Path, table: str, begin: str = README_BEGIN, end: str = README_END
) -> bool:
    """Replace the text between the markers `begin` and `end` of `readme` (the bench's, by
    default); False if it has no such markers."""
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    replacement = f"{begin}\n{table}{end}"
    readme.write_text(pattern.sub(lambda _: replacement, text))
    return True
