"""The PPO loop: rollouts wired to algorithms.ppo, updates, KL control, group modes, resume."""

import math
import random

import pytest
import torch
from tiny_models import FILM_WORDS, TINY_PPO_TRAIN, word_tokenizer

from rlhf_core.algorithms.ppo import compute_gae, group_advantages, shape_rewards, whiten
from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.generation import sequence_logprob_sums
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.ppo_trainer import train_ppo
from rlhf_core.training.rollout import (
    PPOModels,
    iteration_prompt_indices,
    make_experience,
    rewards_and_advantages,
)

WORDS = FILM_WORDS
# Two iterations of the tiny run, each minibatch in 2 micro-batches, no evaluation or checkpoints.
SMALL = dict(TINY_PPO_TRAIN, iterations=2, micro_batch_size=2, eval_every=0, checkpoint_every=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_settings(**overrides) -> PPOTrainSettings:
    return PPOTrainSettings(**{**SMALL, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [
        [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(1 + i % 4))}]
        for i in range(8)
    ]


class SimulatedCrash(RuntimeError):
    """Stands in for a killed process."""


def new_policy(tokenizer) -> PolicyWithValueHead:
    return PolicyWithValueHead(build_tiny_llama("nano", tokenizer, seed=0), seed=0)


def new_reference(tokenizer, seed: int = 0):
    return build_tiny_llama("nano", tokenizer, seed=seed)


def favoured_tokens_scorer(vocab_size: int):
    """Scripted reward: the share of a response's tokens in the lower half of the vocabulary."""

    def score(rollout):
        return torch.tensor(
            [sum(t < vocab_size // 2 for t in ids) / len(ids) for ids in rollout.response_ids]
        )

    return score


def constant_scorer(value: float):
    return lambda rollout: torch.full((len(rollout),), value)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Settings and prompt order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"minibatch_size": 3}, "must divide rollout_batch_size"),
        ({"micro_batch_size": 3}, "must divide minibatch_size"),
        ({"advantage_estimator": "ppo2"}, "advantage_estimator"),
        ({"advantage_estimator": "grpo", "group_size": 3}, "group_size 3 must divide"),
        ({"advantage_estimator": "rloo", "group_size": 1}, "at least 2"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"iterations": 0}, "iterations"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_invalid_settings_raise_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_settings(**overrides)


def test_prompt_order_uses_every_prompt_once_per_pass_and_depends_on_seed():
    first_pass = [i for it in range(3) for i in iteration_prompt_indices(12, 4, it, seed=5)]
    assert sorted(first_pass) == list(range(12))
    second_pass = [i for it in range(3, 6) for i in iteration_prompt_indices(12, 4, it, seed=5)]
    assert sorted(second_pass) == list(range(12))
    assert first_pass != second_pass  # a fresh permutation per pass
    assert iteration_prompt_indices(12, 4, 1, seed=5) == iteration_prompt_indices(12, 4, 1, 5)
    assert first_pass != [i for it in range(3) for i in iteration_prompt_indices(12, 4, it, 6)]
    # A batch larger than the set wraps around into the next pass.
    assert sorted(iteration_prompt_indices(3, 6, 0, seed=0)) == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# One rollout, checked against rlhf_core.algorithms.ppo and rlhf_core.generation directly
# ---------------------------------------------------------------------------------------------


def test_experience_wires_rewards_kl_gae_and_whitening_like_the_ppo_functions(tokenizer, prompts):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer, seed=1)
    scores = torch.linspace(-1.0, 1.0, len(prompts))
    settings = small_settings(missing_eos_penalty=0.0, gamma=0.9, lam=0.8)
    experience, timings = make_experience(
        PPOModels(policy, reference, lambda r: scores.clone(), tokenizer),
        prompts,
        settings,
        0.3,
        seed=0,
    )
    mask = experience.mask.bool()
    rollout = experience.rollout
    assert timings["generation_s"] > 0 and timings["scoring_s"] > 0
    # The mask covers exactly the sampled response tokens.
    assert mask.sum(dim=1).tolist() == [len(ids) for ids in rollout.response_ids]
    # Log-probs are aligned with the sampled tokens: their sums match an independent pass.
    torch.testing.assert_close(
        experience.old_logps.sum(dim=1), sequence_logprob_sums(policy, rollout), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        experience.ref_logps.sum(dim=1),
        sequence_logprob_sums(reference, rollout),
        atol=1e-4,
        rtol=0,
    )
    # KL penalty on response tokens only; the score lands on the last response token.
    assert bool((experience.kl[~mask] == 0).all()) and bool((experience.rewards[~mask] == 0).all())
    assert bool((experience.kl[mask] != 0).any())
    torch.testing.assert_close(
        experience.kl[mask], (experience.old_logps - experience.ref_logps)[mask]
    )
    last = torch.tensor([row.nonzero().max() for row in mask])
    rows = torch.arange(len(prompts))
    expected_last = scores - 0.3 * experience.kl[rows, last]
    torch.testing.assert_close(experience.rewards[rows, last], expected_last)
    before_last = mask.clone()
    before_last[rows, last] = False
    torch.testing.assert_close(experience.rewards[before_last], -0.3 * experience.kl[before_last])
    # The same tensors through rlhf_core.algorithms.ppo directly.
    rewards, _ = shape_rewards(
        experience.scores, experience.old_logps, experience.ref_logps, experience.mask, 0.3
    )
    advantages, returns = compute_gae(rewards, experience.values, experience.mask, 0.9, 0.8)
    torch.testing.assert_close(experience.rewards, rewards)
    torch.testing.assert_close(experience.returns, returns)
    torch.testing.assert_close(experience.advantages, whiten(advantages, experience.mask))
    assert experience.values.shape == experience.mask.shape


def test_missing_eos_penalty_is_subtracted_from_unfinished_responses_only(tokenizer, prompts):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer)
    settings = small_settings(max_new_tokens=3, missing_eos_penalty=2.0)
    experience, _ = make_experience(
        PPOModels(policy, reference, constant_scorer(0.5), tokenizer),
        prompts,
        settings,
        0.0,
        seed=0,
    )
    ended = torch.tensor(experience.rollout.ended)
    assert not bool(ended.all())  # an untrained model rarely stops within 3 tokens
    assert bool((experience.raw_scores == 0.5).all())
    torch.testing.assert_close(experience.scores, torch.where(ended, 0.5, -1.5))
    # With β = 0 the whole reward of a response is its penalised score.
    torch.testing.assert_close(experience.rewards.sum(dim=1), experience.scores)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_sample_groups_and_use_group_advantages(tokenizer, prompts, estimator):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer, seed=1)
    settings = small_settings(advantage_estimator=estimator, group_size=4)
    experience, _ = make_experience(
        PPOModels(policy, reference, favoured_tokens_scorer(len(tokenizer)), tokenizer),
        prompts[:2],
        settings,
        0.2,
        seed=0,
    )
    prompt_ids = experience.rollout.prompt_ids
    assert len(prompt_ids) == 8 and prompt_ids[:4] == [prompt_ids[0]] * 4
    assert prompt_ids[4:] == [prompt_ids[4]] * 4 and prompt_ids[0] != prompt_ids[4]
    assert experience.values is None and experience.returns is None
    sequence_rewards = experience.scores - 0.2 * experience.kl.sum(dim=1)
    per_sequence = group_advantages(sequence_rewards, 4, estimator)
    expected = per_sequence[:, None] * experience.mask  # not re-whitened over tokens
    torch.testing.assert_close(experience.advantages, expected)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_group_with_equal_rewards_gets_no_push_whatever_the_lengths(estimator):
    """Rewards [1, 0, 0, 0 | 5, 5, 5, 5] with responses of unequal lengths: the second group
    has nothing to prefer, so every one of its tokens gets advantage 0."""
    lengths = [3, 1, 4, 2, 5, 1, 3, 2]
    mask = torch.zeros(8, 6)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1.0
    scores = torch.tensor([1.0, 0, 0, 0, 5, 5, 5, 5])
    zeros = torch.zeros(8, 6)
    settings = small_settings(
        advantage_estimator=estimator, group_size=4, kl_in_reward=False, whiten_advantages=True
    )
    _, _, advantages, returns = rewards_and_advantages(
        scores, zeros, zeros, None, mask, settings, kl_coef=0.1
    )
    assert returns is None
    assert torch.equal(advantages[4:], torch.zeros(4, 6))
    assert advantages[0, 0] > 0 > advantages[1, 0]
    assert torch.equal(advantages[mask == 0], torch.zeros(int((mask == 0).sum())))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_scripted_reward_rises_while_kl_stays_bounded(tokenizer, prompts):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer)
    settings = small_settings(
        iterations=10,
        rollout_batch_size=16,
        minibatch_size=16,
        micro_batch_size=None,
        ppo_epochs=2,
        learning_rate=3e-2,
        missing_eos_penalty=0.0,
        init_kl_coef=0.05,
        adaptive_kl=False,
    )
    result = train_ppo(
        PPOModels(policy, reference, favoured_tokens_scorer(len(tokenizer)), tokenizer),
        prompts,
        settings,
        seed=0,
        show_progress=False,
    )
    scores = [row["reward/score_mean"] for row in result.history]
    kls = [row["kl/mean"] for row in result.history]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores
    # Far below the KL of a policy that always picks one token, 6 · log(vocab) ≈ 35 nats.
    assert all(math.isfinite(kl) for kl in kls) and max(kls) < 15.0, kls
    assert result.iterations == 10 and len(result.history) == 10


def test_one_iteration_updates_every_trainable_parameter_and_no_frozen_one(tokenizer, prompts):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer)
    before, reference_before = snapshot(policy), snapshot(reference)
    train_ppo(
        PPOModels(policy, reference, favoured_tokens_scorer(len(tokenizer)), tokenizer),
        prompts,
        small_settings(iterations=1),
        show_progress=False,
    )
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    assert "value_head.weight" in before  # the value head is among the trained parameters
    for name, parameter in reference.named_parameters():
        assert torch.equal(parameter, reference_before[name]) and not parameter.requires_grad


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_train_without_a_value_loss(tokenizer, prompts, estimator):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer)
    head_before = snapshot(policy.value_head)
    lm_before = snapshot(policy.lm)
    result = train_ppo(
        PPOModels(policy, reference, favoured_tokens_scorer(len(tokenizer)), tokenizer),
        prompts,
        small_settings(iterations=1, advantage_estimator=estimator, group_size=4),
        show_progress=False,
    )
    assert not any(key.startswith("value/") for key in result.history[0])
    assert "loss/policy" in result.history[0] and "policy/clip_fraction" in result.history[0]
    for name, parameter in policy.value_head.named_parameters():
        assert torch.equal(parameter, head_before[name])
    assert any(not torch.equal(p, lm_before[n]) for n, p in policy.lm.named_parameters())


@pytest.mark.parametrize("adaptive", [True, False])
def test_kl_controller_is_updated_with_the_measured_kl(tokenizer, prompts, adaptive):
    policy, reference = new_policy(tokenizer), new_reference(tokenizer, seed=1)
    settings = small_settings(
        iterations=3, adaptive_kl=adaptive, init_kl_coef=0.5, target_kl=1.0, kl_horizon=40.0
    )
    result = train_ppo(
        PPOModels(policy, reference, constant_scorer(0.0), tokenizer),
        prompts,
        settings,
        show_progress=False,
    )
    coefs = [row["kl/coef"] for row in result.history]
    kls = [row["kl/mean"] for row in result.history]
    assert coefs[0] == 0.5
    for step in range(2):
        if adaptive:  # Ziegler et al.: β ← β (1 + clip(KL / target − 1, ±0.2) · n / horizon)
            error = min(max(kls[step] / 1.0 - 1.0, -0.2), 0.2)
            assert coefs[step + 1] == pytest.approx(coefs[step] * (1 + error * 8 / 40.0))
        else:
            assert coefs[step + 1] == 0.5
    if adaptive:
        assert coefs[1] != coefs[0]


def test_micro_batches_accumulate_the_exact_minibatch_gradient(tokenizer, prompts):
    norms = []
    for micro in (8, 1):
        settings = small_settings(
            iterations=1, minibatch_size=8, micro_batch_size=micro, ppo_epochs=1, max_grad_norm=0.0
        )
        result = train_ppo(
            PPOModels(
                new_policy(tokenizer),
                new_reference(tokenizer, seed=1),
                favoured_tokens_scorer(len(tokenizer)),
                tokenizer,
            ),
            prompts,
            settings,
            show_progress=False,
        )
        norms.append(result.history[0]["grad_norm"])
    assert norms[0] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_evaluation_runs_before_training_at_the_cadence_and_at_the_end(tokenizer, prompts):
    seen = []
    result = train_ppo(
        PPOModels(new_policy(tokenizer), new_reference(tokenizer), constant_scorer(1.0), tokenizer),
        prompts,
        small_settings(iterations=3, eval_every=2),
        eval_prompts=prompts[:3],
        on_eval=lambda step, metrics: seen.append((step, metrics)),
        show_progress=False,
    )
    assert [step for step, _ in seen] == [0, 2, 3]
    assert seen[0][1]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at 0
    assert seen[0][1]["score_mean"] == 1.0
    assert result.final_eval == seen[-1][1]
    assert 1 <= result.final_eval["length_mean"] <= 6


def test_kill_and_resume_reproduces_the_uninterrupted_run(tokenizer, prompts, tmp_path):
    settings = small_settings(iterations=4, checkpoint_every=2, init_kl_coef=0.2)
    scorer = favoured_tokens_scorer(len(tokenizer))

    def run(policy, checkpoints=None, on_log=None):
        return train_ppo(
            PPOModels(policy, new_reference(tokenizer, seed=1), scorer, tokenizer),
            prompts,
            settings,
            seed=3,
            checkpoints=checkpoints,
            on_log=on_log,
            eval_prompts=prompts[:2],
            show_progress=False,
        )

    uninterrupted_policy = new_policy(tokenizer)
    uninterrupted = run(uninterrupted_policy)

    def crash_at_third_iteration(step, metrics):
        if step == 3:
            raise SimulatedCrash

    manager = CheckpointManager(tmp_path / "ckpt", keep=2, fingerprint="run-a")
    with pytest.raises(SimulatedCrash):
        run(new_policy(tokenizer), manager, crash_at_third_iteration)
    assert [p.name for p in manager.checkpoints()] == ["step-00000002"]

    resumed_policy = new_policy(tokenizer)
    logged = []
    resumed = run(resumed_policy, manager, lambda step, metrics: logged.append(step))
    assert resumed.resumed_from == 2 and resumed.iterations == 4
    assert logged == [1, 2, 3, 4]  # iterations 1-2 replayed from the checkpoint to the logger
    for name, parameter in uninterrupted_policy.named_parameters():
        assert torch.equal(parameter, dict(resumed_policy.named_parameters())[name]), name

    def without_timings(rows):
        return [
            {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}
            for row in rows
        ]

    assert without_timings(resumed.history) == without_timings(uninterrupted.history)
    assert resumed.eval_history == uninterrupted.eval_history
    # A checkpoint from a run with another fingerprint is ignored.
    other = CheckpointManager(tmp_path / "ckpt", keep=2, fingerprint="run-b")
    assert other.latest() is None


def test_saved_policy_and_value_head_reload_whole(tokenizer, prompts, tmp_path):
    policy = new_policy(tokenizer)
    train_ppo(
        PPOModels(
            policy, new_reference(tokenizer), favoured_tokens_scorer(len(tokenizer)), tokenizer
        ),
        prompts,
        small_settings(iterations=1),
        show_progress=False,
    )
    policy.save_pretrained(tmp_path / "policy", tokenizer=tokenizer)
    reloaded = PolicyWithValueHead.from_pretrained(tmp_path / "policy").eval()
    lm_only, _ = load_causal_lm(str(tmp_path / "policy"))
    input_ids = torch.tensor([[5, 17, 42, 99, 7], [3, 8, 120, 64, 2]])
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits, values = policy.eval()(input_ids, attention_mask)
        reloaded_logits, reloaded_values = reloaded(input_ids, attention_mask)
        lm_logits = lm_only(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(reloaded_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(reloaded_values, values, rtol=0, atol=1e-6)
    torch.testing.assert_close(lm_logits, logits, rtol=0, atol=1e-5)


def test_a_nan_loss_stops_ppo_before_the_update(tokenizer, prompts, monkeypatch):
    from rlhf_core.training import ppo_update
    from rlhf_core.training.divergence import TrainingDivergedError

    original = ppo_update._micro_batch_loss

    def nan_loss(*args, **kwargs):
        loss, stats, tokens = original(*args, **kwargs)
        return loss * float("nan"), stats, tokens

    monkeypatch.setattr(ppo_update, "_micro_batch_loss", nan_loss)
    policy, reference = new_policy(tokenizer), new_reference(tokenizer)
    before = snapshot(policy)
    with pytest.raises(TrainingDivergedError, match=r"^ppo iteration 1 of 2 \(rollout rows "):
        train_ppo(
            PPOModels(policy, reference, favoured_tokens_scorer(len(tokenizer)), tokenizer),
            prompts,
            small_settings(iterations=2),
            show_progress=False,
        )
    for name, parameter in policy.named_parameters():  # no update reached the weights
        assert torch.equal(parameter, before[name]), name
