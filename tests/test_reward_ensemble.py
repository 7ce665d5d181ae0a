"""Reward-model ensembles: the aggregation math, the k-member reward stage, PPO's ensemble
scorer and best-of-n's conservative choice (Coste et al. 2023, arXiv:2310.02743)."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from tiny_models import TINY_PPO_TRAIN

import rlhf_core.scoring as scoring_module
import rlhf_core.stages.reward as reward_stage
from rlhf_core.algorithms.ensemble import bootstrap_indices, conservative_reward, ensemble_std
from rlhf_core.algorithms.ppo import penalise_unfinished
from rlhf_core.config import DataSettings
from rlhf_core.config.reward import EnsembleSettings, RewardSettings
from rlhf_core.config.stages import EvaluateSettings, PPOSettings
from rlhf_core.config.training import PPOTrainSettings, SamplingSettings, TrainSettings
from rlhf_core.evaluation.comparison import ResponseJudge, sample_best_of_n
from rlhf_core.generation import generate
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import (
    ENSEMBLE_MANIFEST,
    load_reward_members,
    member_dir,
    score_members,
    score_token_ids,
    write_ensemble_manifest,
)
from rlhf_core.stages.common import StageContext, load_validated, train_eval_split
from rlhf_core.stages.ppo import run_ppo
from rlhf_core.stages.reward import member_seed, pair_groups, run_reward
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.training.rollout import EnsembleScorer, reward_scorer, with_ensemble_std

pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------

SCORES = torch.tensor([[1.0, -2.0, 0.5, 3.0], [3.0, 0.0, 0.5, -1.0], [2.0, 1.0, 0.5, 1.0]])


def test_aggregates_are_mean_min_and_mean_less_lambda_population_std():
    mean = torch.tensor([2.0, -1 / 3, 0.5, 1.0])
    population_std = torch.tensor(np.std(SCORES.numpy(), axis=0, ddof=0))
    assert torch.allclose(conservative_reward(SCORES, "mean"), mean)
    assert torch.equal(conservative_reward(SCORES, "min"), torch.tensor([1.0, -2.0, 0.5, -1.0]))
    assert torch.allclose(ensemble_std(SCORES), population_std)
    assert float(ensemble_std(SCORES)[2]) == 0.0  # members that agree have no spread
    penalised = conservative_reward(SCORES, "mean_minus_std", std_coef=0.5)
    assert torch.allclose(penalised, mean - 0.5 * population_std)
    sample_std = torch.tensor(np.std(SCORES.numpy(), axis=0, ddof=1))
    assert not torch.allclose(penalised, mean - 0.5 * sample_std)  # population, not sample
    # the conservative rewards never exceed the mean, and rank the agreeing response higher
    assert bool((conservative_reward(SCORES, "min") <= mean).all())
    assert bool((penalised <= mean).all())


@pytest.mark.parametrize("mode", ["mean", "mean_minus_std", "min"])
def test_one_member_every_aggregate_is_that_members_score(mode):
    one = torch.tensor([[0.3, -1.7, 2.2]])
    assert torch.equal(conservative_reward(one, mode, std_coef=5.0), one[0])
    assert torch.equal(ensemble_std(one), torch.zeros(3))


def test_bad_aggregates_and_shapes_are_one_clear_error():
    with pytest.raises(ValueError, match="Unknown reward aggregate 'max'"):
        conservative_reward(SCORES, "max")
    with pytest.raises(ValueError, match=r"shape \(members, responses\)"):
        conservative_reward(torch.ones(4), "mean")
    with pytest.raises(ValueError, match=r"shape \(members, responses\)"):
        ensemble_std(torch.ones(0, 3))


def test_bootstrap_indices_are_seeded_resamples_with_replacement():
    first = bootstrap_indices(200, seed=7)
    assert first == bootstrap_indices(200, seed=7)
    assert first != bootstrap_indices(200, seed=8)
    assert len(first) == 200 and all(0 <= i < 200 for i in first)
    distinct = len(set(first)) / 200
    assert 0.5 < distinct < 0.75  # about 1 − 1/e of them, as a bootstrap draws
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_indices(0, seed=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EnsembleSettings(members=0), "reward.ensemble.members must be an integer >= 1"),
        (lambda: EnsembleSettings(bootstrap="yes"), "reward.ensemble.bootstrap must be true"),
        (lambda: PPOSettings(reward_aggregate="max"), "policy.ppo.reward_aggregate must be"),
        (lambda: PPOSettings(reward_std_coef=-1.0), "policy.ppo.reward_std_coef must be"),
        (lambda: EvaluateSettings(best_of_n_aggregate="median"), "evaluate.best_of_n_aggregate"),
        (lambda: EvaluateSettings(best_of_n_std_coef=float("inf")), "best_of_n_std_coef must"),
    ],
)
def test_bad_ensemble_settings_are_one_error_line(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_settings_default_to_one_model_and_the_mean():
    assert RewardSettings().ensemble == EnsembleSettings(members=1, bootstrap=True)
    assert RewardSettings(ensemble={"members": 3}).ensemble.members == 3
    assert (PPOSettings().reward_aggregate, PPOSettings().reward_std_coef) == ("mean", 1.0)
    assert EvaluateSettings().best_of_n_aggregate == "mean"


# --------------------------------------------------------------------------------------------
# The reward stage with k members
# --------------------------------------------------------------------------------------------


def _reward_settings(members: int, **train) -> RewardSettings:
    base = dict(learning_rate=3e-3, warmup_steps=1, max_steps=4, batch_size=8, eval_every=2)
    return RewardSettings(
        train=TrainSettings(**{**base, **train}),
        ensemble=EnsembleSettings(members=members, bootstrap=True),
    )


def _run(project, tiny_params, members: int, **train) -> dict:
    data = DataSettings(eval_fraction=tiny_params.data.eval_fraction)
    context = StageContext(data, 0, project, show_progress=False)
    return run_reward(_reward_settings(members, **train), context)


def _files(directory) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def single_and_pair(tiny_project_template, tmp_path_factory, mlflow_uri):
    """The reward stage run once with one member and once with two, each on a fresh copy of
    the tiny project: {members: (project, metrics)}."""
    from conftest import TINY_PARAMS

    from rlhf_core.config import parse_params

    params = parse_params(TINY_PARAMS)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        for members in (1, 2):
            project = tmp_path_factory.mktemp(f"members_{members}") / "project"
            shutil.copytree(tiny_project_template, project)
            runs[members] = (project, _run(project, params, members, checkpoint_every=2))
    return runs


def test_two_members_are_saved_listed_and_measured_one_by_one(single_and_pair, mlflow_uri):
    project, metrics = single_and_pair[2]
    paths = ProjectPaths(project)
    reward_dir = paths.reward_model_dir
    manifest = json.loads((reward_dir / ENSEMBLE_MANIFEST).read_text())
    assert [m["path"] for m in manifest["members"]] == [".", "members/1"]
    assert [m["seed"] for m in manifest["members"]] == [0, member_seed(0, 1)]
    assert [m["bootstrap"] for m in manifest["members"]] == [False, True]
    assert (member_dir(reward_dir, 1) / "model.safetensors").is_file()
    assert (member_dir(reward_dir, 1) / "score_head.safetensors").is_file()
    assert not paths.checkpoints_dir("reward").exists()  # member checkpoints went with it

    members = load_reward_members(reward_dir)
    assert len(members) == 2
    first, second = (dict(m.named_parameters()) for m in members)
    assert not torch.equal(first["score.weight"], second["score.weight"])
    trunk = "backbone.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[trunk], second[trunk])  # both trained, apart

    # reward.json: member 0's numbers as with one model, each member's, and the ensemble's
    # accuracy of the mean score, which the saved members reproduce.
    assert json.loads(paths.metrics_file("reward").read_text()) == pytest.approx(metrics)
    assert metrics["member_0/eval_accuracy"] == metrics["eval_accuracy"]
    for key in ("eval_accuracy", "eval_loss", "train_loss", "steps"):
        assert f"member_1/{key}" in metrics, key
    assert metrics["member_1/steps"] == metrics["steps"] == 4
    tokenizer = load_causal_lm(str(paths.sft_model_dir))[1]
    eval_fraction = 0.2
    train_pairs, eval_pairs = train_eval_split(load_validated(paths, "preference"), eval_fraction)
    groups = pair_groups(tokenizer, eval_pairs, 256, False)
    chosen = [g.sequences[0].input_ids for g in groups]
    rejected = [g.sequences[1].input_ids for g in groups]
    pad = tokenizer.pad_token_id
    mean_chosen = torch.stack([score_token_ids(m, chosen, pad) for m in members]).mean(0)
    mean_rejected = torch.stack([score_token_ids(m, rejected, pad) for m in members]).mean(0)
    expected = float((mean_chosen > mean_rejected).float().mean())
    assert metrics["ensemble/eval_accuracy"] == pytest.approx(expected)
    assert metrics["ensemble/members"] == 2
    # each member centred on the same training responses
    train_groups = pair_groups(tokenizer, train_pairs, 256, False)
    rankings, _ = train_eval_split(load_validated(paths, "ranked"), eval_fraction)
    train_groups += reward_stage.ranking_groups(tokenizer, rankings, 256)
    sequences = [s.input_ids for g in train_groups for s in g.sequences]
    for member in members:
        assert abs(float(score_token_ids(member, sequences, pad).mean())) < 1e-4

    client = MlflowClient(mlflow_uri)
    run_id = read_producer_run_id(reward_dir)
    assert len(client.get_metric_history(run_id, "loss")) == 4  # member 0, as with one model
    assert len(client.get_metric_history(run_id, "member_1/loss")) == 4
    assert client.get_metric_history(run_id, "member_1/eval/accuracy")
    assert client.get_metric_history(run_id, "ensemble/eval_accuracy")
    assert client.get_run(run_id).data.params["reward.ensemble.members"] == "2"


def test_one_member_leaves_the_reward_model_as_it_was_and_is_member_zero(single_and_pair):
    single_project, single = single_and_pair[1]
    pair_project, pair = single_and_pair[2]
    single_files = _files(ProjectPaths(single_project).reward_model_dir)
    pair_files = _files(ProjectPaths(pair_project).reward_model_dir)
    assert ENSEMBLE_MANIFEST not in single_files
    assert not any(name.startswith("members") for name in single_files)
    assert not any(key.startswith(("member_", "ensemble/")) for key in single)
    assert len(load_reward_members(ProjectPaths(single_project).reward_model_dir)) == 1
    # member 0 of the pair is the single model, byte for byte
    pair_top = {
        name: data
        for name, data in pair_files.items()
        if name != ENSEMBLE_MANIFEST and not name.startswith("members")
    }
    assert pair_top.keys() == single_files.keys()
    for name in ("model.safetensors", "score_head.safetensors", "reward_model.json"):
        assert pair_top[name] == single_files[name], name
    for key in ("eval_accuracy", "eval_loss", "train_loss", "reward_offset"):
        assert pair[key] == single[key], key


@pytest.mark.slow  # two reward-stage runs
def test_an_interrupted_ensemble_keeps_finished_members_and_resumes(
    single_and_pair, tiny_project, tiny_params, monkeypatch, mlflow_uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    original_manifest = scoring_module.write_ensemble_manifest

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(scoring_module, "write_ensemble_manifest", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tiny_project, tiny_params, 2, checkpoint_every=2)
    paths = ProjectPaths(tiny_project)
    finished = paths.checkpoints_dir("reward") / "member-1" / "final"
    assert (finished / "score_head.safetensors").is_file()

    monkeypatch.setattr(scoring_module, "write_ensemble_manifest", original_manifest)
    trained = []
    original_train = reward_stage._train_member
    monkeypatch.setattr(
        reward_stage,
        "_train_member",
        lambda stage, *args: trained.append(stage.member) or original_train(stage, *args),
    )
    metrics = _run(tiny_project, tiny_params, 2, checkpoint_every=2)
    assert trained == []  # member 1 was loaded, not trained again
    assert metrics["resumed_from"] == 2  # member 0 went on from its checkpoint
    uninterrupted_project, uninterrupted = single_and_pair[2]
    resumed_files = _files(paths.reward_model_dir)
    for name, data in _files(ProjectPaths(uninterrupted_project).reward_model_dir).items():
        if name.endswith(".safetensors"):
            assert resumed_files[name] == data, name
    assert metrics["ensemble/eval_accuracy"] == uninterrupted["ensemble/eval_accuracy"]


def test_several_processes_with_an_ensemble_are_refused(tiny_project, tiny_params, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launch\.num_processes: 1 or set members: 1"):
        _run(tiny_project, tiny_params, 2)


# --------------------------------------------------------------------------------------------
# Consumers: PPO's scorer and best-of-n
# --------------------------------------------------------------------------------------------


@pytest.fixture
def two_members(tiny_project):
    """Two untrained reward models on the tiny SFT model (different score heads), their
    tokenizer and the tiny project's evaluation prompts."""
    paths = ProjectPaths(tiny_project)
    causal_lm, tokenizer = load_causal_lm(str(paths.sft_model_dir))
    members = [
        RewardModel.from_causal_lm(copy.deepcopy(causal_lm), seed=seed).eval() for seed in (0, 1)
    ]
    prompts = list(load_validated(paths, "eval_prompts")["prompt"])[:4]
    return causal_lm, members, tokenizer, prompts


def test_min_scorer_is_the_elementwise_min_of_the_members_on_a_rollout(two_members):
    causal_lm, members, tokenizer, prompts = two_members
    rollout = generate(causal_lm, tokenizer, prompts * 2, SamplingSettings(max_new_tokens=8), 3)
    sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids, strict=True)]
    pad = tokenizer.pad_token_id
    each = torch.stack([score_token_ids(m, sequences, pad, 3) for m in members])  # (2, n)
    assert not torch.equal(each[0], each[1])

    scorer = reward_scorer(members, pad, 3, "min", 1.0)
    assert isinstance(scorer, EnsembleScorer)
    assert scorer.last_std_mean is None
    assert torch.equal(scorer(rollout), torch.minimum(each[0], each[1]))
    spread = float(((each[0] - each[1]).abs() / 2).mean())  # population std of two
    assert scorer.last_std_mean == pytest.approx(spread, rel=1e-5)
    logged = []
    on_log = with_ensemble_std(lambda step, metrics: logged.append((step, metrics)), scorer)
    on_log(1, {"reward/score_mean": 0.0})
    assert logged == [(1, {"reward/score_mean": 0.0, "reward/ensemble_std_mean": spread})]

    mean_minus_std = reward_scorer(members, pad, 3, "mean_minus_std", 2.0)(rollout)
    assert torch.allclose(mean_minus_std, each.mean(0) - 2.0 * each.std(0, unbiased=False))
    # one member: the single model's scorer, and the logger left as it was
    single = reward_scorer(members[:1], pad, 3, "min", 1.0)
    assert not isinstance(single, EnsembleScorer)
    assert torch.equal(single(rollout), each[0])
    assert with_ensemble_std(on_log, single) is on_log


@pytest.mark.slow  # a PPO stage run
def test_ppo_trains_on_the_ensemble_aggregate_and_logs_its_spread(tiny_project, tiny_params):
    paths = ProjectPaths(tiny_project)
    causal_lm, _ = load_causal_lm(str(paths.sft_model_dir))
    RewardModel.from_causal_lm(causal_lm, seed=5).save_pretrained(
        member_dir(paths.reward_model_dir, 1)
    )
    write_ensemble_manifest(paths.reward_model_dir, [0, 5], bootstrap=False)
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    settings = PPOSettings(
        train=PPOTrainSettings(**{**TINY_PPO_TRAIN, "iterations": 2, "eval_every": 0}),
        max_eval_prompts=4,
        reward_aggregate="min",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        metrics = run_ppo(
            settings, StageContext(tiny_params.data, 0, tiny_project, show_progress=False)
        )
    assert metrics["iterations"] == 2
    run_id = read_producer_run_id(paths.policy_dir("ppo"))
    spread = MlflowClient(uri).get_metric_history(run_id, "reward/ensemble_std_mean")
    assert [m.step for m in spread] == [1, 2] and all(m.value > 0 for m in spread)


def test_best_of_n_picks_by_the_aggregate_and_reports_the_mean(two_members):
    causal_lm, members, tokenizer, prompts = two_members
    judge = ResponseJudge(
        members[0], tokenizer, None, 8, members=members, best_of_n_aggregate="min"
    )
    sampling = SamplingSettings(max_new_tokens=8)
    best = sample_best_of_n(causal_lm, tokenizer, prompts, judge, sampling, 11, [2, 4])

    pool_prompts = prompts * 4  # the same pool, drawn again with the same seed
    pool = generate(causal_lm, tokenizer, pool_prompts, sampling, 11)
    each = score_members(members, tokenizer, pool_prompts, pool.texts, 8, ended=pool.ended)
    flags = torch.tensor(pool.ended)
    each = torch.stack([penalise_unfinished(row, flags, 1.0, None) for row in each]).double()
    worst = each.min(0).values.reshape(4, len(prompts)).T  # (items, candidates)
    for n in (2, 4):
        picked = worst[:, :n].argmax(1)
        rows = [int(c) * len(prompts) + i for i, c in enumerate(picked)]
        assert best[n].texts == [pool.texts[r] for r in rows]
        assert np.allclose(best[n].rm_scores, each.mean(0).numpy()[rows])
        assert np.allclose(
            judge.rm_scores(prompts, best[n].texts, best[n].ended), best[n].rm_scores
        )

    # one member: best-of-n picks and reports the single model's score, as before
    single = ResponseJudge(members[0], tokenizer, None, 8, best_of_n_aggregate="min")
    reported, picked_by = single.best_of_n_scores(prompts, pool.texts[:4], pool.ended[:4])
    assert reported is picked_by
    assert np.array_equal(reported, single.rm_scores(prompts, pool.texts[:4], pool.ended[:4]))
