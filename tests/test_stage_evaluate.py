"""The evaluation stage on the tiny project: metrics, consistency, reports, MLflow run, errors."""

import copy
import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from rlhf_core.config import DataSettings
from rlhf_core.config.data import DemoSettings
from rlhf_core.config.stages import EvaluateSettings
from rlhf_core.data.demo import read_reward_eval, write_demo
from rlhf_core.data.gold import GoldJudge, expected_agreement
from rlhf_core.evaluation.comparison import select_best_of_n
from rlhf_core.evaluation.metrics import POLICY_SUMMARY_KEYS
from rlhf_core.generation import Rollout, SamplingSettings
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm, load_tokenizer, save_model
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import score
from rlhf_core.stages.common import StageContext, load_validated, train_eval_split
from rlhf_core.stages.evaluate import run_evaluate
from rlhf_core.tracking.lineage import read_producer_run_id, run_marker_path

# Every policy's summary holds these (distinct-n too, checked in test_evaluation_metrics).
REQUIRED_POLICY_KEYS = tuple(k for k in POLICY_SUMMARY_KEYS if not k.startswith("distinct"))
# The reward model's block: numbers in [0, 1] (eval_margin_mean aside) and nested tables.
REWARD_MODEL_KEYS = (
    "eval_accuracy",
    "eval_accuracy_ci_low",
    "eval_accuracy_ci_high",
    "annotator_agreement",
    "annotator_agreement_expected",
    "rm_gold_agreement",
    "ece_vs_labels",
    "ece_vs_gold",
)
REWARD_EVAL_PAIRS = 40  # the demo's reward_eval set, cut from 1000 to keep the test fast
BEST_OF_N = (2, 3)
PROMPTS, SAMPLES_PER_PROMPT, SAMPLES_IN_REPORT = 4, 2, 3
SETTINGS = EvaluateSettings(
    sampling=SamplingSettings(max_new_tokens=8, batch_size=16),
    best_of_n=BEST_OF_N,
    samples_per_prompt=SAMPLES_PER_PROMPT,
    max_prompts=PROMPTS,
    samples_in_report=SAMPLES_IN_REPORT,
    batch_size=16,
    sanity_prompts={"Tell me about a film.": "the", "Name a city.": "paris"},
    sanity_max_new_tokens=6,
)
DATA = DataSettings(eval_fraction=0.2)  # the demo task, so the gold judge is on
POLICIES = ("sft", "dpo", "ppo", *(f"bon_{n}" for n in BEST_OF_N))


def _perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with Gaussian noise of std `scale` added to every weight."""
    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return noisy


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    """One MLflow store for the module's runs (creating a store takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
        yield uri


@pytest.fixture(scope="module")
def evaluated(tiny_project_template, tmp_path_factory, tracking_store):
    """The stage run once on a copy of the tiny project: "dpo" is an exact copy of SFT, "ppo"
    a noisy copy."""
    root = shutil.copytree(tiny_project_template, tmp_path_factory.mktemp("evaluate") / "project")
    paths = ProjectPaths(root)
    # The demo as prepare writes it with demo.n_reward_eval_pairs: 40 (the other sets are the
    # same: each has a random stream of its own).
    written = json.loads((paths.raw_dir / "demo_meta.json").read_text())["settings"]
    demo = dataclasses.replace(DemoSettings(**written), n_reward_eval_pairs=REWARD_EVAL_PAIRS)
    write_demo(demo, paths.raw_dir)
    sft_model, tokenizer = load_causal_lm(str(paths.sft_model_dir))
    save_model(sft_model, tokenizer, paths.policy_dir("dpo"))
    save_model(_perturbed(sft_model, 0.1, seed=1), tokenizer, paths.policy_dir("ppo"))
    results = run_evaluate(
        SETTINGS, StageContext(DATA, 0, root, show_progress=False), algorithms=["dpo", "ppo"]
    )
    metrics = json.loads(paths.metrics_file("evaluate").read_text())
    responses = [
        json.loads(line)
        for line in (paths.evaluation_dir / "responses.jsonl").read_text().splitlines()
    ]
    run_id = read_producer_run_id(paths.evaluation_dir)
    return SimpleNamespace(
        paths=paths, results=results, metrics=metrics, responses=responses, run_id=run_id
    )


def _texts(responses: list[dict], policy: str) -> list[str]:
    rows = sorted(
        (row for row in responses if row["policy"] == policy),
        key=lambda row: (row["prompt_index"], row["sample_index"]),
    )
    return [row["response"] for row in rows]


def test_metrics_file_has_every_policy_and_the_reward_model_block(evaluated):
    metrics = evaluated.metrics
    assert set(metrics) == {*POLICIES, "reward_model"}
    for policy in POLICIES:
        for key in REQUIRED_POLICY_KEYS:
            assert math.isfinite(metrics[policy][key]), (policy, key)
        low, high = (metrics[policy][f"rm_win_rate_vs_sft_ci_{end}"] for end in ("low", "high"))
        assert low <= metrics[policy]["rm_win_rate_vs_sft"] <= high
    block = metrics["reward_model"]
    for key in REWARD_MODEL_KEYS:
        assert 0.0 <= block[key] <= 1.0, key
    assert math.isfinite(block["eval_margin_mean"])
    assert block["eval_accuracy_ci_low"] <= block["eval_accuracy"] <= block["eval_accuracy_ci_high"]
    assert sum(bucket["pairs"] for bucket in block["gold_margin_buckets"].values()) == (
        REWARD_EVAL_PAIRS
    )
    assert sum(b["pairs"] for b in block["calibration_bins"].values()) == REWARD_EVAL_PAIRS
    assert metrics == json.loads(json.dumps(evaluated.results))  # the stage returns the file
    for policy in POLICIES:
        assert len(_texts(evaluated.responses, policy)) == PROMPTS * SAMPLES_PER_PROMPT


def test_a_policy_identical_to_sft_draws_its_own_samples_and_has_zero_kl(evaluated):
    """Each policy samples from a stream of its own: a copy of SFT answers differently from
    SFT's own samples (coupled draws would make every win rate depend on the coupling), its
    KL is exactly 0, and its win-rate interval holds the tie rate 0.5."""
    sft, same, noisy = (evaluated.metrics[name] for name in ("sft", "dpo", "ppo"))
    assert _texts(evaluated.responses, "dpo") != _texts(evaluated.responses, "sft")
    assert sft["gold_win_rate_vs_sft"] == sft["rm_win_rate_vs_sft"] == 0.5
    for policy in (sft, same):
        assert policy["kl_to_sft"] == 0.0
    for key in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft"):
        assert same[f"{key}_ci_low"] <= 0.5 <= same[f"{key}_ci_high"]
    assert noisy["kl_to_sft"] > 0.0
    assert noisy["kl_to_sft_stderr"] > 0.0
    assert _texts(evaluated.responses, "ppo") != _texts(evaluated.responses, "sft")


def test_best_of_n_kl_is_analytic_and_more_candidates_never_lower_the_reward(evaluated):
    metrics = evaluated.metrics
    for n in BEST_OF_N:
        assert metrics[f"bon_{n}"]["kl_to_sft"] == pytest.approx(math.log(n) - (n - 1) / n)
    # bon_3 chooses from a superset of bon_2's candidates, prompt by prompt.
    smaller = [row for row in evaluated.responses if row["policy"] == "bon_2"]
    larger = [row for row in evaluated.responses if row["policy"] == "bon_3"]
    for small, large in zip(smaller, larger, strict=True):
        assert large["rm_score"] >= small["rm_score"]
    assert metrics["bon_3"]["rm_score_mean"] >= metrics["bon_2"]["rm_score_mean"]


def test_select_best_of_n_picks_the_highest_reward_among_the_first_n():
    items, n_max = 3, 4
    texts = [f"candidate {j} of item {i}" for j in range(n_max) for i in range(items)]
    candidates = Rollout(
        prompt_ids=[[1]] * len(texts),
        response_ids=[[2]] * len(texts),
        ended=[True] * len(texts),
        texts=texts,
    )
    rewards = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.7, 0.9], [0.4, 0.4, 0.1, 0.0]])
    rows, chosen = select_best_of_n(candidates, rewards, 3)
    assert [texts[row] for row in rows] == [
        "candidate 1 of item 0",
        "candidate 2 of item 1",
        "candidate 0 of item 2",  # a tie goes to the earlier candidate
    ]
    assert chosen.tolist() == [0.9, 0.7, 0.4]
    _, chosen_of_all = select_best_of_n(candidates, rewards, n_max)
    assert chosen_of_all.tolist() == [0.9, 0.9, 0.4]
    with pytest.raises(ValueError, match="between 1 and 4"):
        select_best_of_n(candidates, rewards, 5)


def test_reward_model_block_matches_a_direct_computation(evaluated):
    """On the demo the reward model is checked on the reward_eval pairs prepare wrote."""
    paths = evaluated.paths
    pairs = read_reward_eval(paths.raw_dir / "reward_eval.jsonl")
    assert len(pairs) == REWARD_EVAL_PAIRS
    reward_model = RewardModel.from_pretrained(paths.reward_model_dir)
    tokenizer = load_tokenizer(str(paths.reward_model_dir))
    prompts = [pair["prompt"] for pair in pairs]
    chosen_texts = [pair["chosen"] for pair in pairs]
    rejected_texts = [pair["rejected"] for pair in pairs]
    chosen = score(reward_model, tokenizer, prompts, chosen_texts, batch_size=16)
    rejected = score(reward_model, tokenizer, prompts, rejected_texts, batch_size=16)
    judge = GoldJudge()
    chosen_gold, rejected_gold = judge.score_batch(chosen_texts), judge.score_batch(rejected_texts)
    gold_outcomes = [
        1.0 if c > r else 0.5 if c == r else 0.0
        for c, r in zip(chosen_gold, rejected_gold, strict=True)
    ]
    temperature = json.loads((paths.raw_dir / "demo_meta.json").read_text())["settings"][
        "annotator_temperature"
    ]
    block = evaluated.metrics["reward_model"]
    assert block["eval_set"] == "reward_eval"
    assert block["eval_pairs"] == REWARD_EVAL_PAIRS
    correct = int((chosen > rejected).sum())
    assert block["eval_accuracy"] == pytest.approx(correct / REWARD_EVAL_PAIRS)
    # Wilson's interval of `correct` out of 40, by its formula.
    z, n, share = 1.959964, REWARD_EVAL_PAIRS, correct / REWARD_EVAL_PAIRS
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    assert block["eval_accuracy_ci_low"] == pytest.approx(centre - half, abs=1e-5)
    assert block["eval_accuracy_ci_high"] == pytest.approx(centre + half, abs=1e-5)
    assert block["eval_margin_mean"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert block["annotator_agreement"] == pytest.approx(float(np.mean(gold_outcomes)))
    assert block["annotator_agreement_expected"] == pytest.approx(
        expected_agreement(chosen_gold, rejected_gold, temperature)
    )


def test_sanity_prompts_are_answered_greedily_by_sft_and_each_policy(evaluated):
    text = (evaluated.paths.evaluation_dir / "sanity.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| sft", "| dpo", "| ppo"))]
    assert len(rows) == len(SETTINGS.sanity_prompts) * 3  # sft, dpo, ppo per question
    by_policy: dict[str, list[str]] = {}
    for row in rows:
        name, passes, answer = (cell.strip() for cell in row.strip("|").split(" | ", 2))
        by_policy.setdefault(name, []).append(answer)
        expected = "the" if len(by_policy[name]) == 1 else "paris"
        ended = not answer.endswith("…(no EOS)")
        assert passes == ("yes" if ended and expected in answer.casefold() else "no")
    assert set(by_policy) == {"sft", "dpo", "ppo"}
    assert by_policy["dpo"] == by_policy["sft"]  # greedy: SFT's exact copy answers the same
    for policy in ("sft", "dpo", "ppo"):
        passed = [
            cell == "yes"
            for cell in (
                row.strip("|").split(" | ")[1].strip()
                for row in rows
                if row.startswith(f"| {policy} ")
            )
        ]
        assert evaluated.metrics[policy]["sanity_pass_fraction"] == sum(passed) / len(passed)
    assert "sanity_pass_fraction" not in evaluated.metrics["bon_2"]  # best-of-n is SFT's


def test_reports_and_plots_are_written(evaluated):
    paths = evaluated.paths
    comparison = (paths.evaluation_dir / "comparison.md").read_text()
    for policy in POLICIES:
        assert f"| {policy} |" in comparison
    assert f"## Reward model on {REWARD_EVAL_PAIRS} held-out pairs (reward_eval)" in comparison
    assert "| eval_accuracy |" in comparison and "| ece_vs_gold |" in comparison
    bucket_rows = [line for line in comparison.splitlines() if line.startswith("| q")]
    assert len(bucket_rows) == len(evaluated.metrics["reward_model"]["gold_margin_buckets"]) >= 2
    assert "![reliability diagram](reward_model_reliability.png)" in comparison
    reliability = paths.evaluation_dir / "reward_model_reliability.png"
    assert reliability.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (paths.evaluation_dir / "samples.md").read_text().splitlines()
    table_rows = [line for line in samples if line.startswith("|")]
    assert len(table_rows) == 2 + SAMPLES_IN_REPORT  # header, alignment, one row per prompt
    assert table_rows[0].startswith("| prompt | sft | sft_score | dpo |")
    assert (paths.plots_dir / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((paths.plots_dir / "reward_vs_kl.json").read_text())
    assert [row["policy"] for row in rows] == list(POLICIES)
    for row in rows:
        assert row["kl_to_sft"] == evaluated.metrics[row["policy"]]["kl_to_sft"]
        assert row["gold_score_mean"] == evaluated.metrics[row["policy"]]["gold_score_mean"]
    marker = json.loads(run_marker_path(paths.evaluation_dir).read_text())
    assert marker["stage"] == "evaluate"


def test_mlflow_run_has_metrics_figure_and_lineage(evaluated, tracking_store):
    client = MlflowClient(tracking_uri=tracking_store)
    run = client.get_run(evaluated.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate best_of_n=2,3"
    for policy in POLICIES:
        for key in REQUIRED_POLICY_KEYS:
            assert run.data.metrics[f"{policy}/{key}"] == pytest.approx(
                evaluated.metrics[policy][key]
            )
    block = evaluated.metrics["reward_model"]
    for key in ("eval_accuracy", "eval_accuracy_ci_low", "ece_vs_labels", "ece_vs_gold"):
        assert run.data.metrics[f"reward_model/{key}"] == pytest.approx(block[key])
    assert run.data.metrics["reward_model/gold_margin_buckets/q1/accuracy"] == pytest.approx(
        block["gold_margin_buckets"]["q1"]["accuracy"]
    )
    plots = {item.path for item in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/reward_vs_kl.png" in plots
    reports = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/comparison.md",
        "evaluation/samples.md",
        "evaluation/reward_model_reliability.png",
    } <= reports
    for name in ("sft", "reward", "policy.dpo", "policy.ppo", "eval_prompts", "reward_eval"):
        assert f"input.{name}.md5" in run.data.tags


def test_missing_policy_dir_names_the_stage_to_run(tiny_project):
    with pytest.raises(FileNotFoundError, match=r"dvc repro policy@ppo"):
        run_evaluate(
            SETTINGS, StageContext(DATA, 0, tiny_project, show_progress=False), algorithms=["ppo"]
        )


def test_without_a_gold_judge_gold_metrics_are_null(tiny_project, tracking_store):
    settings = EvaluateSettings(
        sampling=SamplingSettings(max_new_tokens=4), best_of_n=(), max_prompts=2, bootstrap=False
    )
    results = run_evaluate(
        settings,
        StageContext(
            DataSettings(source="files", eval_fraction=0.2), 0, tiny_project, show_progress=False
        ),
        algorithms=[],
    )
    assert set(results) == {"sft", "reward_model"}
    assert results["sft"]["gold_score_mean"] is None
    assert results["sft"]["gold_win_rate_vs_sft"] is None
    assert math.isfinite(results["sft"]["rm_score_mean"])
    block = results["reward_model"]
    # Off the demo the reward model is checked on the preference set's held-out split.
    _, held_out = train_eval_split(load_validated(ProjectPaths(tiny_project), "preference"), 0.2)
    assert block["eval_set"] == "preference_held_out"
    assert block["eval_pairs"] == len(held_out) > 0
    for key in ("annotator_agreement", "annotator_agreement_expected", "rm_gold_agreement"):
        assert block[key] is None, key
    assert block["ece_vs_gold"] is None and block["gold_margin_buckets"] == {}
    assert 0.0 <= block["eval_accuracy"] <= 1.0
    assert 0.0 <= block["ece_vs_labels"] <= 1.0
    assert all(b["gold_probability"] is None for b in block["calibration_bins"].values())
    samples = (ProjectPaths(tiny_project).evaluation_dir / "samples.md").read_text()
    assert "scores from the reward model" in samples


def test_settings_accept_params_yaml_shapes():
    settings = EvaluateSettings(sampling={"max_new_tokens": 12, "temperature": 0.8}, best_of_n=[8])
    assert settings.sampling == SamplingSettings(max_new_tokens=12, temperature=0.8)
    assert settings.best_of_n == (8,)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"best_of_n": (1, 4)}, "at least 2"),
        ({"best_of_n": (4, 4)}, "twice"),
        ({"samples_per_prompt": 0}, "samples_per_prompt"),
        ({"max_prompts": 0}, "max_prompts"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"bootstrap": "yes"}, "bootstrap"),
        ({"sampling": {"temperature": 0.0}}, "temperature"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvaluateSettings(**overrides)
