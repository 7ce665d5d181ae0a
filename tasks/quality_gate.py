"""Prefect task: the quality gate after a pipeline run.

Registers the best passing policy as the candidate (`rlhf-policy`, its reward model in
`rlhf-reward`), measures it head to head against the champion when there is one, and moves
the alias `champion` only when the gate passes. Loaded by path from flows/
(`rlhf_core.scripts.load_script`), never installed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rlhf_core.tracking.lineage import read_producer_run_id

EVALUATION_METRICS = Path("artifacts") / "metrics" / "evaluate.json"


def gate_settings(project_root: Path, override: Mapping[str, Any] | None = None) -> Any:
    """GateSettings from `override`, else params.yaml's `gate:` section, else the defaults."""
    from rlhf_core.config.gate import GateSettings

    if override:
        values = dict(override)
        if "candidate_policies" in values:
            values["candidate_policies"] = tuple(values["candidate_policies"])
        return GateSettings(**values)
    params_file = project_root / "params.yaml"
    if not params_file.is_file():
        return GateSettings()
    from rlhf_core.config import load_params

    section = getattr(load_params(params_file), "gate", None)
    if section is None or isinstance(section, GateSettings):
        return section or GateSettings()
    return gate_settings(project_root, section.model_dump())


def stage_metrics(project_root: Path, policies: Sequence[str]) -> dict[str, Any]:
    """Each policy's training-stage metrics (artifacts/metrics/<policy>.json) that exist: the
    gate's `block_on_overoptimisation` reads PPO's alarm there."""
    metrics_dir = project_root / EVALUATION_METRICS.parent
    return {
        policy: json.loads((metrics_dir / f"{policy}.json").read_text(encoding="utf-8"))
        for policy in policies
        if (metrics_dir / f"{policy}.json").is_file()
    }


def human_votes(project_root: Path, candidate: str, champion: Any) -> dict[str, Any] | None:
    """What people said in `rlhf label` about the candidate policy against the champion:
    the votes whose sides were trained by the candidate's run and the champion's run
    (`human_votes.head_to_head` by run id), plus every vote's count and the annotators'
    agreement. None when nobody has voted yet."""
    from dataclasses import asdict

    from rlhf_core.data.votes import VoteJournal
    from rlhf_core.evaluation.human_votes import annotator_agreement, head_to_head
    from rlhf_core.paths import ProjectPaths

    paths = ProjectPaths(project_root)
    votes = VoteJournal(paths.labels_dir, paths.incoming_dir).votes()
    if not votes:
        return None
    candidate_run = read_producer_run_id(paths.policy_dir(candidate))
    versus = head_to_head(
        votes, candidate_run, champion.run_id, fields=("model_a_run_id", "model_b_run_id")
    )
    agreement = annotator_agreement(votes)
    return {
        **asdict(versus),
        "counted": versus.counted,
        "votes_total": len(votes),
        "agreement": agreement.rate,
        "agreement_pairs": agreement.annotator_pairs,
    }


def log_human_votes(human: dict[str, Any]) -> None:
    """People's numbers on the active MLflow run, beside the gate's other metrics."""
    import mlflow

    names = {
        "votes_total": "human.votes_total",
        "counted": "human.votes_vs_champion",
        "win_rate": "human.win_rate_vs_champion",
        "low": "human.win_rate_low",
        "high": "human.win_rate_high",
        "agreement": "human.agreement",
    }
    mlflow.log_metrics(
        {name: float(human[key]) for key, name in names.items() if human.get(key) is not None}
    )


def measure_head_to_head(project_root: Path, policy: str, client: Any, champion: Any) -> dict:
    """Win rate of `artifacts/policy/<policy>` against the champion's files on the held-out
    prompts; judged by the gold judge for demo data, else by the candidate's reward model."""
    from rlhf_core.config import load_params
    from rlhf_core.data.gold import GoldJudge
    from rlhf_core.evaluation.head_to_head import head_to_head_win_rate
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.common import load_validated
    from rlhf_core.tracking.registry import download_model_dir

    params = load_params(project_root / "params.yaml")
    paths = ProjectPaths(project_root)
    # The evaluate stage's sampling and prompt budget, when params.yaml has that section.
    evaluate = getattr(params, "evaluate", None)
    max_prompts = getattr(evaluate, "max_prompts", None)
    prompts = load_validated(paths, "eval_prompts")["prompt"].tolist()[:max_prompts]
    judge = GoldJudge() if params.data.source == "demo" else None
    with tempfile.TemporaryDirectory(prefix="champion-") as scratch:
        champion_dir = download_model_dir(client, champion, Path(scratch))
        return head_to_head_win_rate(
            paths.policy_dir(policy),
            champion_dir,
            prompts,
            sampling=getattr(evaluate, "sampling", None),
            seed=params.seed,
            judge=judge,
            reward_model_dir=paths.reward_model_dir,
        )


@task(name="quality-gate", cache_policy=NO_CACHE)
def quality_gate(project_root: str, settings: Any) -> dict[str, Any]:
    """Register the best passing policy as the candidate and promote it if the gate passes.

    With no champion, passing the absolute thresholds is enough (the first champion); with
    one, the candidate must also win head to head. A candidate that already is the champion
    (nothing upstream changed) is left alone. The decision goes to the active MLflow run
    (`registry.log_decision`). Returns the decision as a dict, with "status" promoted |
    kept | unchanged.
    """
    import mlflow

    from rlhf_core.gate import decide, select_candidate
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.tracking import registry

    root = Path(project_root)
    logger = get_run_logger()
    evaluation = json.loads((root / EVALUATION_METRICS).read_text(encoding="utf-8"))
    client = registry.registry_client(root)
    champion = registry.current_champion(client)
    trained = stage_metrics(root, settings.candidate_policies)
    selection = select_candidate(evaluation, settings, trained)
    head_to_head = None
    if champion is not None and selection.candidate is not None:
        policy_dir = ProjectPaths(root).policy_dir(selection.candidate)
        if read_producer_run_id(policy_dir) == champion.run_id:
            reason = (
                f"{selection.candidate} (run {champion.run_id}) already is the champion "
                f"({registry.POLICY_MODEL} v{champion.version}): nothing new to gate"
            )
            logger.info("gate: %s", reason)
            mlflow.set_tags({"gate.result": "unchanged", "gate.reasons": reason})
            return {
                "status": "unchanged",
                "promote": False,
                "candidate": selection.candidate,
                "reasons": [reason],
                "champion_version": str(champion.version),
            }
        head_to_head = measure_head_to_head(root, selection.candidate, client, champion)
    human = None
    if champion is not None and selection.candidate is not None:
        human = human_votes(root, selection.candidate, champion)
        if human is not None:
            log_human_votes(human)
    win_rate = None if head_to_head is None else head_to_head["win_rate"]
    decision = decide(
        evaluation,
        settings,
        win_rate,
        has_champion=champion is not None,
        stage_metrics=trained,
        human=human,
    )
    candidate = None
    if decision.candidate is not None:
        candidate = registry.register_candidate(
            root, decision.candidate, evaluation, decision, client
        )
    registry.log_decision(decision, candidate, client)
    if decision.promote:
        registry.promote(client, candidate)
    for reason in decision.reasons:
        logger.info("gate: %s", reason)
    return {
        "status": "promoted" if decision.promote else "kept",
        **decision.as_dict(),
        "head_to_head": head_to_head,
        "human": human,
        "champion_version": None if champion is None else str(champion.version),
        "policy_version": None if candidate is None else candidate.policy_version,
        "reward_version": None if candidate is None else candidate.reward_version,
    }


def log_gate_outcome(decision: Mapping[str, Any]) -> None:
    """The gate's outcome on the active pipeline run: tag `gate.status` (promoted | kept |
    unchanged | skipped) and metric `gate.promoted` (1 or 0), a column of the runs table."""
    import mlflow

    mlflow.set_tag("gate.status", decision["status"])
    mlflow.log_metric("gate.promoted", 1.0 if decision["status"] == "promoted" else 0.0)
