"""The shared workload: one tokenizer, one set of initial weights and one data set for both sides.

`build_workspace` writes, under a folder:

    base/               tokenizer + freshly initialised Llama (safetensors), the starting point
                        of every run, ours and TRL's alike
    sft.jsonl           {"prompt": messages, "prompt_text": rendered, "completion": str}
    preference.jsonl    {"prompt": messages, "prompt_text": rendered, "chosen", "rejected"}
    prompts.jsonl       {"prompt": messages} for PPO rollouts
    workload.json       the settings and the token-length statistics of the data

Texts come from the embedded demo task (movie reviews): each completion joins several demo
responses until it reaches a length drawn uniformly in [min_length, max_length), so lengths
vary like real data and length grouping and padding matter. Every sequence (prompt + response
+ EOS) stays below `max_length`, so neither side truncates and both see the same tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.settings import BenchSettings

BASE_DIR = "base"
# Draws allowed for a first part that fits (small vocabularies make long token sequences).
MAX_FIRST_PART_DRAWS = 1000


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class LengthFiller:
    """Joins pool texts into one response whose full sequence has about a target length."""

    def __init__(self, tokenizer: Any, pool: Sequence[str], rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.pool = list(pool)
        self.rng = rng

    def fill(self, prompt_length: int, target: int, limit: int) -> str:
        """Texts from the pool, joined, so prompt + response + EOS ≈ target (< limit) tokens."""
        parts: list[str] = []
        length = prompt_length + 1  # the EOS
        misses = 0
        while length < target:
            part = self.rng.choice(self.pool)
            added = len(self.tokenizer.encode(" " + part, add_special_tokens=False))
            if length + added >= limit:
                if parts:
                    break
                misses += 1  # a first part too long for the limit: draw another
                if misses > MAX_FIRST_PART_DRAWS:
                    break
                continue
            parts.append(part)
            length += added
        text = " ".join(parts)
        while parts and self.sequence_length(prompt_length, text) >= limit:
            parts.pop()
            text = " ".join(parts)
        if not parts:
            raise ValueError(f"prompt of {prompt_length} tokens leaves no room below {limit}")
        return text

    def sequence_length(self, prompt_length: int, text: str) -> int:
        return prompt_length + len(self.tokenizer.encode(text, add_special_tokens=False)) + 1


def build_workspace(settings: BenchSettings, out_dir: str | Path) -> dict[str, Any]:
    """Write the shared tokenizer, initial weights and data under `out_dir` (see module doc)."""
    import torch

    from rlhf_core.config.data import DemoSettings
    from rlhf_core.data.demo import corpus_texts, generate_demo
    from rlhf_core.models.loading import save_model
    from rlhf_core.models.tiny import build_tiny_llama, count_parameters
    from rlhf_core.models.tokenizer import train_bpe_tokenizer
    from rlhf_core.training.tokenize import prompt_token_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = settings.total_steps
    n_sft = settings.sft_batch_size * steps
    n_pairs = settings.pair_batch_size * steps
    demo = generate_demo(
        DemoSettings(
            seed=settings.seed,
            n_sft=max(200, n_sft),
            n_preference_prompts=max(200, n_pairs),
            n_ppo_prompts=max(16, settings.ppo_rollout_batch_size),
            n_eval_prompts=16,
        )
    )
    if settings.base_model:
        from rlhf_core.models.loading import load_causal_lm

        model, tokenizer = load_causal_lm(settings.base_model)
    else:
        tokenizer = train_bpe_tokenizer(corpus_texts(demo), vocab_size=settings.vocab_size)
        model = build_tiny_llama(settings.model_config, tokenizer, seed=settings.seed)
    if settings.model_vocab_size and not settings.base_model:
        if settings.model_vocab_size < len(tokenizer):
            raise ValueError(f"model_vocab_size is below the tokenizer's {len(tokenizer)} tokens")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model.resize_token_embeddings(settings.model_vocab_size, mean_resizing=False)
    save_model(model, tokenizer, out / BASE_DIR)

    rng = random.Random(settings.seed)
    pool = [row["completion"] for row in demo.sft]
    chosen_pool = [row["chosen"] for row in demo.preferences]
    rejected_pool = [row["rejected"] for row in demo.preferences]

    def target() -> int:
        return rng.randrange(settings.min_length, settings.max_length)

    sft_rows, lengths = [], {"sft": [], "chosen": [], "rejected": []}
    filler = LengthFiller(tokenizer, pool, rng)
    for row in demo.sft[:n_sft]:
        prompt_length = len(prompt_token_ids(tokenizer, row["prompt"]))
        completion = filler.fill(prompt_length, target(), settings.max_length)
        lengths["sft"].append(filler.sequence_length(prompt_length, completion))
        sft_rows.append(_with_text(tokenizer, row["prompt"], completion=completion))
    pair_rows = []
    chosen_filler = LengthFiller(tokenizer, chosen_pool, rng)
    rejected_filler = LengthFiller(tokenizer, rejected_pool, rng)
    for row in demo.preferences[:n_pairs]:
        prompt_length = len(prompt_token_ids(tokenizer, row["prompt"]))
        chosen = chosen_filler.fill(prompt_length, target(), settings.max_length)
        rejected = rejected_filler.fill(prompt_length, target(), settings.max_length)
        lengths["chosen"].append(chosen_filler.sequence_length(prompt_length, chosen))
        lengths["rejected"].append(rejected_filler.sequence_length(prompt_length, rejected))
        pair_rows.append(_with_text(tokenizer, row["prompt"], chosen=chosen, rejected=rejected))
    prompts = [{"prompt": row["prompt"]} for row in demo.ppo_prompts]

    _write_jsonl(sft_rows, out / "sft.jsonl")
    _write_jsonl(pair_rows, out / "preference.jsonl")
    _write_jsonl(
        prompts[: settings.ppo_rollout_batch_size * settings.ppo_iterations], out / "prompts.jsonl"
    )
    summary = {
        "settings": settings.to_dict(),
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": model.config.vocab_size,
        "parameters": count_parameters(model),
        "sequences": {
            name: {"count": len(values), "mean": sum(values) / len(values), "max": max(values)}
            for name, values in lengths.items()
        },
    }
    (out / "workload.json").write_text(json.dumps(summary, indent=2))
    return summary


def _with_text(tokenizer: Any, prompt: list[dict[str, str]], **responses: str) -> dict[str, Any]:
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return {"prompt": prompt, "prompt_text": text, **responses}


def load_rows(workspace: str | Path, name: str) -> list[dict[str, Any]]:
    """Rows of `<workspace>/<name>.jsonl`."""
    return _read_jsonl(Path(workspace) / f"{name}.jsonl")


def base_dir(workspace: str | Path) -> Path:
    """The folder of the shared initial model and tokenizer."""
    return Path(workspace) / BASE_DIR


def load_settings(workspace: str | Path) -> BenchSettings:
    """The `BenchSettings` the workspace was built with."""
    data = json.loads((Path(workspace) / "workload.json").read_text())
    return BenchSettings(**data["settings"])
