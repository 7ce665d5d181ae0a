"""What people's votes on pairs of answers say: the head-to-head win rate of the candidate
over the champion with its 95% interval, and how often annotators agree on the same pair.

Pure functions of vote records (no I/O), so the page's live tally (`rlhf label`), a retrain
summary and the quality gate read the same numbers from the same votes log.

A vote record is a mapping with at least:

    comparison_id   the pair of answers voted on (the same id for everyone shown that pair)
    verdict         "a" | "b" | "tie" | "both_bad"
    model_a         who wrote answer A ("champion", "candidate", or a model's name)
    model_b         who wrote answer B
    annotator       who voted ("" or absent: anonymous)

Counting rules:
- A tie scores ½ a win for each side (the usual rule of head-to-head evaluations, e.g.
  Chatbot Arena's win rate with ties split); "both bad" says nothing about which is better,
  so it is left out of the win rate (and counted apart).
- Agreement compares every two named annotators who voted on the same comparison: they agree
  when their verdicts are equal. Anonymous votes cannot be told apart and are left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from rlhf_core.evaluation.metrics import wilson_interval

VERDICTS = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class HeadToHead:
    """Votes between `challenger` and `incumbent`, from the challenger's side.

    Attributes:
        wins, losses, ties: decisive votes for and against the challenger, and ties.
        both_bad: votes that found both answers bad (not in the win rate).
        win_rate: (wins + ties/2) / (wins + losses + ties); None without such votes.
        low, high: its 95% Wilson interval ((0, 1) without votes).
    """

    challenger: str
    incumbent: str
    wins: int
    losses: int
    ties: int
    both_bad: int
    win_rate: float | None
    low: float
    high: float

    @property
    def counted(self) -> int:
        """Votes in the win rate: wins, losses and ties."""
        return self.wins + self.losses + self.ties


def head_to_head(
    votes: Iterable[Mapping[str, Any]],
    challenger: str = "candidate",
    incumbent: str = "champion",
    fields: tuple[str, str] = ("model_a", "model_b"),
) -> HeadToHead:
    """The challenger's win rate over the incumbent in the votes that compared the two
    (whichever side each stood on); votes on other pairs are ignored.

    `fields` names the fields that say who wrote answers A and B: ("model_a", "model_b") are
    their roles on the page (champion, candidate); ("model_a_run_id", "model_b_run_id") the
    MLflow runs that trained them, which is how the gate finds the votes on the exact policy
    it decides about."""
    wins = losses = ties = both_bad = 0
    for vote in votes:
        sides = (vote.get(fields[0]), vote.get(fields[1]))
        if set(sides) != {challenger, incumbent}:
            continue
        verdict = vote.get("verdict")
        if verdict == "tie":
            ties += 1
        elif verdict == "both_bad":
            both_bad += 1
        elif verdict in ("a", "b"):
            winner = sides[0] if verdict == "a" else sides[1]
            if winner == challenger:
                wins += 1
            else:
                losses += 1
    counted = wins + losses + ties
    score = wins + ties / 2
    low, high = wilson_interval(score, counted) if counted else (0.0, 1.0)  # no votes yet
    win_rate = score / counted if counted else None
    return HeadToHead(challenger, incumbent, wins, losses, ties, both_bad, win_rate, low, high)


@dataclass(frozen=True)
class Agreement:
    """How often two annotators who voted on the same comparison gave the same verdict.

    Attributes:
        comparisons: comparisons that two or more named annotators voted on.
        annotator_pairs: pairs of annotators over those comparisons (3 voters on one: 3 pairs).
        agreeing: of those pairs, how many gave the same verdict.
        rate: agreeing / annotator_pairs; None when no comparison had two voters.
    """

    comparisons: int
    annotator_pairs: int
    agreeing: int
    rate: float | None


def annotator_agreement(votes: Iterable[Mapping[str, Any]]) -> Agreement:
    """Pairwise percent agreement between named annotators on shared comparisons.

    An annotator who voted twice on one comparison counts with their last vote; anonymous
    votes (no annotator) are left out, since two of them may be one person.
    """
    verdicts: dict[str, dict[str, str]] = defaultdict(dict)  # comparison -> annotator -> verdict
    for vote in votes:
        annotator = vote.get("annotator") or ""
        if annotator and vote.get("verdict") in VERDICTS:
            verdicts[vote["comparison_id"]][annotator] = vote["verdict"]
    shared = [by_annotator for by_annotator in verdicts.values() if len(by_annotator) >= 2]
    pairs = agreeing = 0
    for by_annotator in shared:
        for first, second in combinations(by_annotator.values(), 2):
            pairs += 1
            agreeing += first == second
    rate = agreeing / pairs if pairs else None
    return Agreement(len(shared), pairs, agreeing, rate)


def verdict_counts(votes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many votes of each verdict ("a", "b", "tie", "both_bad")."""
    counts = dict.fromkeys(VERDICTS, 0)
    for vote in votes:
        if vote.get("verdict") in counts:
            counts[vote["verdict"]] += 1
    return counts


def win_rates_line(
    candidate: str, policy_metrics: Mapping[str, Any], human: Mapping[str, Any] | None
) -> str:
    """One line with the candidate's win rates side by side: the gold judge's and the reward
    model's over SFT (evaluate stage), and people's over the champion (`rlhf label`) with its
    95% interval, e.g. "dpo: gold win rate vs SFT 0.71, RM 0.68; people vs the champion 0.65
    (95% 0.43-0.82, 20 votes)". A number nobody measured reads "n/a"."""

    def number(value: Any) -> str:
        return "n/a" if value is None else f"{float(value):.2f}"

    text = (
        f"{candidate}: gold win rate vs SFT {number(policy_metrics.get('gold_win_rate_vs_sft'))}, "
        f"RM {number(policy_metrics.get('rm_win_rate_vs_sft'))}; people vs the champion "
    )
    counted = int((human or {}).get("counted") or 0)
    if not counted:
        return text + "n/a (no votes on this candidate)"
    return (
        text + f"{number(human['win_rate'])} (95% {number(human['low'])}-"
        f"{number(human['high'])}, {counted} vote{'s' if counted != 1 else ''})"
    )
