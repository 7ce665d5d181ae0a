"""Our PPO on the shared workload: where an iteration's time goes, and generation speed.

An iteration is rollout generation (sampling with the KV cache), scoring (policy log-probs and
values, reference log-probs, reward-model scores) and the update (PPO epochs over minibatches).
Generation is compared with a plain `model.generate` call (KV cache on, same prompts, same
sampling and length) on the same weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.flops import matmul_weights
from benchmarks.settings import BenchSettings
from benchmarks.workload import base_dir, load_rows


def ppo_flops_per_token(policy_weights: int, reward_weights: int, ppo_epochs: int) -> float:
    """Matmul FLOPs per rollout token (prompt + response) of one PPO iteration.

    Generation runs one forward per token with the KV cache (2·N), scoring one forward each of
    the policy, the reference and the reward model (2·N + 2·N + 2·N_rm), the update
    `ppo_epochs` forward-backward passes (6·N each); N counts matmul weights (`flops.py`).
    Attention over the context is left out (small at these lengths), so this undercounts.
    """
    return 2.0 * policy_weights * 3 + 2.0 * reward_weights + 6.0 * policy_weights * ppo_epochs


def run_ppo(workspace: Path, settings: BenchSettings) -> dict[str, Any]:
    """PPO (GAE, value head, adaptive KL) for `settings.ppo_iterations` iterations."""
    import torch

    from rlhf_core.config.training import PPOTrainSettings
    from rlhf_core.models.heads import PolicyWithValueHead, RewardModel
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.training.ppo_trainer import train_ppo
    from rlhf_core.training.rollout import PPOModels, reward_model_scorer

    source = str(base_dir(workspace))
    lm, tokenizer = load_causal_lm(source)
    policy = PolicyWithValueHead(lm, seed=settings.seed)
    reference, _ = load_causal_lm(source)
    reward_lm, _ = load_causal_lm(source)
    reward_model = RewardModel.from_causal_lm(reward_lm, seed=settings.seed).eval()
    reward_model.requires_grad_(False)
    scorer = reward_model_scorer(reward_model, tokenizer.pad_token_id)
    prompts = [row["prompt"] for row in load_rows(workspace, "prompts")]
    ppo_settings = PPOTrainSettings(
        iterations=settings.ppo_iterations,
        rollout_batch_size=settings.ppo_rollout_batch_size,
        max_new_tokens=settings.ppo_max_new_tokens,
        minibatch_size=settings.ppo_minibatch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
    )
    result = train_ppo(
        PPOModels(policy, reference, scorer, tokenizer),
        prompts,
        ppo_settings,
        seed=settings.seed,
        show_progress=False,
    )
    history = result.history
    timed = history[1:] if len(history) > 1 else history  # the first iteration warms up
    split = {
        name: sum(entry[f"time/{name}_s"] for entry in timed)
        for name in ("generation", "scoring", "update", "iteration")
    }
    other = split["iteration"] - split["generation"] - split["scoring"] - split["update"]
    generation = _generation_comparison(policy.lm, tokenizer, prompts, settings)
    tokens = sum(e["tokens_per_s"] * e["time/iteration_s"] for e in timed)
    flops = tokens * ppo_flops_per_token(
        matmul_weights(policy.lm), matmul_weights(reward_model), ppo_settings.ppo_epochs
    )
    return {
        "iterations": len(history),
        "timed_iterations": len(timed),
        "tokens_per_s": tokens / split["iteration"],
        "flops_per_s": flops / split["iteration"],
        "final_loss": float(history[-1]["loss"]),
        "time_split_s": {
            **{k: split[k] for k in ("generation", "scoring", "update")},
            "other": max(0.0, other),
        },
        "time_split_fraction": {
            k: split[k] / split["iteration"] for k in ("generation", "scoring", "update")
        },
        "generation": generation,
        "model": policy,
        "torch_threads": torch.get_num_threads(),
    }


def _best_seconds(run, repeats: int = 3) -> tuple[float, Any]:
    """Fastest of `repeats` timed calls of `run()` after one untimed warm-up call."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def _generation_comparison(lm, tokenizer, prompts, settings: BenchSettings) -> dict[str, float]:
    """Generated tokens/s: `rlhf_core.generation.generate` vs plain `lm.generate` (KV cache).

    Same prompts (one left-padded batch), same length limit, multinomial sampling at T = 1 on
    both sides; each side warmed up once and timed as the best of three calls.
    """
    import torch

    from rlhf_core.generation import SamplingSettings, generate, render_prompts

    batch = prompts[: settings.ppo_rollout_batch_size]
    sampling = SamplingSettings(max_new_tokens=settings.ppo_max_new_tokens, batch_size=len(batch))
    ours_s, rollout = _best_seconds(
        lambda: generate(lm, tokenizer, batch, sampling, seed=settings.seed)
    )
    ours_tokens = sum(len(ids) for ids in rollout.response_ids)

    ids = render_prompts(tokenizer, batch)
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        input_ids[row, width - len(row_ids) :] = torch.tensor(row_ids)
        attention[row, width - len(row_ids) :] = 1

    def plain():
        with torch.inference_mode():
            torch.manual_seed(settings.seed)
            return lm.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                top_k=0,
                max_new_tokens=settings.ppo_max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )

    lm.eval()
    plain_s, sequences = _best_seconds(plain)
    eos = tokenizer.eos_token_id
    # real generated tokens: up to and including each row's first EOS
    plain_tokens = sum(
        row.index(eos) + 1 if eos in row else len(row) for row in sequences[:, width:].tolist()
    )
    return {
        "ours_tokens_per_s": ours_tokens / ours_s,
        "plain_generate_tokens_per_s": plain_tokens / plain_s,
        "ratio": (ours_tokens / ours_s) / (plain_tokens / plain_s),
    }
