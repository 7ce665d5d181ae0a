"""One process of the multi-process PPO checks of tests/test_ppo_processes.py.

    accelerate launch --multi_gpu --num_processes 2 ... ppo_process_worker.py OUT_DIR

Every process builds the same seeded tiny models and runs, in order:

- `whiten`: each process whitens its shard of one fixed tensor over both processes;
- `update-<case>`: one `_update` on a fixed experience, each process holding some of its rows
  (3 + 2 of 5), under DDP with SGD; the main process also runs the single-process update of
  the whole experience on its own copy of the policy;
- `nan`: an update in which only the last process's loss is NaN;
- `train-gae`, `train-grpo`: whole `train_ppo` runs; `resume-gae`: the GAE run resumed from
  its checkpoint of iteration 2;
- `too-few-prompts`: a run with one prompt per iteration for two processes.

Each writes what it got under OUT_DIR (`<check>-rank<r>.json`, `<check>-rank<r>.safetensors`,
and `<check>-single.safetensors` for the single-process update); the test compares them.
"""

import json
import random
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from tiny_models import FILM_WORDS, TINY_PPO_TRAIN, word_tokenizer

from rlhf_core.algorithms.ppo import whiten
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.training import ppo_trainer, ppo_update
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.distributed import reduce_sums
from rlhf_core.training.divergence import TrainingDivergedError
from rlhf_core.training.rollout import PPOModels, make_experience

# The fixed experience's rows held by each process in the update checks: 3 + 2 of 5.
UPDATE_ROWS = {0: [0, 1, 2], 1: [3, 4]}
UPDATE_CASES = {
    # Accumulation: 3 micro-batches on one process, 2 (+ one of weight zero) on the other.
    "accumulate": dict(minibatch_size=5, micro_batch_size=1, ppo_epochs=2, max_grad_norm=1.0),
    # Minibatches of one row: in each, one process holds no row at all.
    "one-row": dict(minibatch_size=1, micro_batch_size=None, ppo_epochs=1, max_grad_norm=0.0),
}
TRAIN_CASES = {
    # 5 prompts per iteration: 3 on the main process, 2 on the other.
    "gae": dict(rollout_batch_size=5, minibatch_size=5, micro_batch_size=1, ppo_epochs=2),
    # 3 prompts × 2 samples: 2 groups (4 rows) on the main process, 1 group on the other.
    "grpo": dict(
        rollout_batch_size=6,
        minibatch_size=3,
        micro_batch_size=None,
        advantage_estimator="grpo",
        group_size=2,
    ),
}


def settings(**overrides) -> PPOTrainSettings:
    base = dict(TINY_PPO_TRAIN, iterations=3, eval_every=0, checkpoint_every=0)
    return PPOTrainSettings(**{**base, "init_kl_coef": 0.1, **overrides})


def prompts() -> list[list[dict[str, str]]]:
    rng = random.Random(1)
    return [
        [{"role": "user", "content": " ".join(rng.choice(FILM_WORDS) for _ in range(1 + i % 4))}]
        for i in range(8)
    ]


def new_policy(tokenizer) -> PolicyWithValueHead:
    return PolicyWithValueHead(build_tiny_llama("nano", tokenizer, seed=0), seed=0)


def favoured_tokens_score(vocab_size: int, rollout) -> torch.Tensor:
    """The share of a response's tokens in the lower half of the vocabulary."""
    return torch.tensor(
        [sum(t < vocab_size // 2 for t in ids) / len(ids) for ids in rollout.response_ids]
    )


class RecordingScorer:
    """The scripted scorer, recording what each rollout it scores for training holds."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.rollouts: list[dict[str, list]] = []
        self.evaluating = False

    def __call__(self, rollout) -> torch.Tensor:
        scores = favoured_tokens_score(self.vocab_size, rollout)
        if not self.evaluating:
            self.rollouts.append(
                {
                    "scores": scores.tolist(),
                    "ended": list(rollout.ended),
                    "lengths": [len(ids) for ids in rollout.response_ids],
                }
            )
        return scores


def write(out: Path, name: str, rank: int, record: dict, model: torch.nn.Module | None = None):
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    if model is not None:
        save_file(weights(model), str(out / f"{name}-rank{rank}.safetensors"))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}


def check_whiten(accelerator: Accelerator, out: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(5, 6, generator=generator) * 3 + 1  # (rows, tokens)
    mask = (torch.rand(5, 6, generator=generator) > 0.3).long()
    rows = UPDATE_ROWS[accelerator.process_index]
    whitened = whiten(
        values[rows], mask[rows], reduce_sums=lambda sums: reduce_sums(accelerator, sums)
    )
    write(
        out,
        "whiten",
        accelerator.process_index,
        {"values": values.tolist(), "mask": mask.tolist(), "rows": rows, "out": whitened.tolist()},
    )


def fixed_experience(tokenizer, case_settings: PPOTrainSettings):
    """Five responses sampled by one process's policy (seeded: the same on every process)."""
    reference = build_tiny_llama("nano", tokenizer, seed=1)
    models = PPOModels(
        new_policy(tokenizer), reference, lambda r: favoured_tokens_score(len(tokenizer), r),
        tokenizer,
    )  # fmt: skip
    experience, _ = make_experience(models, prompts()[:5], case_settings, 0.1, seed=11)
    return experience


def run_update(policy, experience, case_settings, accelerator=None, rows=None):
    """One `_update` with SGD (a step proportional to the gradient, so the weights compare the
    gradients; Adam's first steps are near sign(g) and would magnify rounding noise)."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trained = policy
    if accelerator is not None:
        trained, optimizer = accelerator.prepare(policy, optimizer)
    generator = torch.Generator().manual_seed(5)
    return ppo_update.update(
        trained, experience, case_settings, optimizer, scheduler, generator,
        accelerator=accelerator, rows=rows,
    )  # fmt: skip


def check_updates(accelerator: Accelerator, tokenizer, out: Path) -> None:
    rank = accelerator.process_index
    rows = UPDATE_ROWS[rank]
    for name, overrides in UPDATE_CASES.items():
        case_settings = settings(rollout_batch_size=5, **overrides)
        experience = fixed_experience(tokenizer, case_settings)
        policy = new_policy(tokenizer)
        metrics = run_update(policy, experience.select(rows), case_settings, accelerator, rows)
        record = {"metrics": metrics, "input_ids_sum": int(experience.input_ids.sum())}
        write(out, f"update-{name}", rank, record, policy)
        if accelerator.is_main_process:
            single = new_policy(tokenizer)
            single_metrics = run_update(single, experience, case_settings)
            save_file(weights(single), str(out / f"update-{name}-single.safetensors"))
            (out / f"update-{name}-single.json").write_text(json.dumps(single_metrics))
        accelerator.wait_for_everyone()


def check_nan(accelerator: Accelerator, tokenizer, out: Path) -> None:
    """Only the last process's loss is NaN: every process must stop with the error."""
    rank = accelerator.process_index
    original = ppo_update._micro_batch_loss

    def nan_on_last_process(*args, **kwargs):
        loss, stats, tokens = original(*args, **kwargs)
        return (loss * float("nan"), stats, tokens) if rank == 1 else (loss, stats, tokens)

    case_settings = settings(rollout_batch_size=5, **UPDATE_CASES["accumulate"])
    experience = fixed_experience(tokenizer, case_settings)
    policy = new_policy(tokenizer)
    before = weights(policy)
    ppo_update._micro_batch_loss = nan_on_last_process
    try:
        run_update(policy, experience.select(UPDATE_ROWS[rank]), case_settings, accelerator,
                   UPDATE_ROWS[rank])  # fmt: skip
        error = ""
    except TrainingDivergedError as raised:
        error = str(raised)
    finally:
        ppo_update._micro_batch_loss = original
    unchanged = all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    write(out, "nan", rank, {"error": error, "weights_unchanged": unchanged})


def check_training(accelerator: Accelerator, tokenizer, out: Path) -> None:
    original_evaluate = ppo_trainer.evaluate_policy
    try:
        for name in TRAIN_CASES:
            train_case(accelerator, tokenizer, out, name, original_evaluate)
    finally:
        ppo_trainer.evaluate_policy = original_evaluate


def train_case(accelerator: Accelerator, tokenizer, out: Path, name: str, evaluate) -> None:
    """A 3-iteration run; the GAE run checkpoints at iteration 2 and is resumed from it.
    `evaluate` is `evaluate_policy`; its scorer calls are left out of the record."""
    rank = accelerator.process_index
    scorer = RecordingScorer(len(tokenizer))

    def evaluate_unrecorded(*args, **kwargs):
        scorer.evaluating = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            scorer.evaluating = False

    ppo_trainer.evaluate_policy = evaluate_unrecorded
    logged, evaluated = [], []
    checkpoints = CheckpointManager(out / f"checkpoints-{name}", keep=1, fingerprint=name)
    run_settings = settings(checkpoint_every=2 if name == "gae" else 0, **TRAIN_CASES[name])

    def run(policy):
        return ppo_trainer.train_ppo(
            PPOModels(policy, build_tiny_llama("nano", tokenizer, seed=1), scorer, tokenizer),
            prompts(),
            run_settings,
            seed=3,
            eval_prompts=prompts()[:3],
            checkpoints=checkpoints,
            on_log=lambda step, metrics: logged.append(step),
            on_eval=lambda step, metrics: evaluated.append(step),
            show_progress=False,
            accelerator=accelerator,
        )

    policy = new_policy(tokenizer)
    result = run(policy)
    record = {
        "history": result.history,
        "rollouts": scorer.rollouts,
        "logged": logged,
        "evaluated": evaluated,
        "eval_history": result.eval_history,
        "value_head_trainable": all(p.requires_grad for p in policy.value_head.parameters()),
    }
    write(out, f"train-{name}", rank, record, policy)
    if name == "gae":  # every process loads the checkpoint of iteration 2
        resumed_policy = new_policy(tokenizer)
        resumed = run(resumed_policy)
        record = {"resumed_from": resumed.resumed_from, "history": resumed.history}
        write(out, "resume-gae", rank, record, resumed_policy)


def check_too_few_prompts(accelerator: Accelerator, tokenizer, out: Path) -> None:
    """One prompt per iteration cannot be shared by two processes: a clear error on each."""
    models = PPOModels(
        new_policy(tokenizer), build_tiny_llama("nano", tokenizer, seed=1),
        lambda r: favoured_tokens_score(len(tokenizer), r), tokenizer,
    )  # fmt: skip
    try:
        ppo_trainer.train_ppo(
            models,
            prompts(),
            settings(rollout_batch_size=1, minibatch_size=1),
            show_progress=False,
            accelerator=accelerator,
        )
        error = ""
    except ValueError as raised:
        error = str(raised)
    write(out, "too-few-prompts", accelerator.process_index, {"error": error})


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    # Without a GPU accelerate only forms a multi-process group over gloo when told cpu=True
    # (`--multi_gpu` alone leaves each process on its own).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 processes but runs on {accelerator.num_processes}")
    tokenizer = word_tokenizer()
    check_whiten(accelerator, out)
    check_updates(accelerator, tokenizer, out)
    check_nan(accelerator, tokenizer, out)
    check_training(accelerator, tokenizer, out)
    check_too_few_prompts(accelerator, tokenizer, out)
    accelerator.wait_for_everyone()
    (out / f"done-rank{accelerator.process_index}").write_text("ok")


if __name__ == "__main__":
    main()
