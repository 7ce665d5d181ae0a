"""Out-of-task sanity prompts: does a tuned policy still answer a plain general question?

Fine-tuning a pretrained model on one task can wreck what it knew while every in-task metric
improves (a toy learning rate turned "What is the capital of France?" into a movie review,
with a falling held-out loss). Each policy answers each sanity prompt greedily; an answer
passes when it ended (EOS) and contains the expected text (case-insensitive). The answers go
to `sanity.md` for a human to read; the pass share goes into the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SANITY_METRIC = "sanity_pass_fraction"


@dataclass(frozen=True)
class SanityAnswer:
    """One policy's greedy answer to one sanity prompt, and whether it passes."""

    prompt: str
    expected: str
    answer: str
    ended: bool

    @property
    def passed(self) -> bool:
        """Ended, and the expected text appears in the answer (case-insensitive)."""
        return self.ended and self.expected.casefold() in self.answer.casefold()


def answer_sanity_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Mapping[str, str],
    max_new_tokens: int,
) -> list[SanityAnswer]:
    """Greedy answers of `model` to each `{prompt: expected text}`, as single user turns."""
    from rlhf_core.generation import SamplingSettings, generate

    questions = list(prompts)
    rollout = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": question}] for question in questions],
        SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False),
    )
    return [
        SanityAnswer(question, prompts[question], text, ended)
        for question, text, ended in zip(questions, rollout.texts, rollout.ended, strict=True)
    ]


def pass_fraction(answers: Sequence[SanityAnswer]) -> float:
    """Share of `answers` that pass."""
    if not answers:
        raise ValueError("no sanity answers")
    return sum(answer.passed for answer in answers) / len(answers)


def sanity_markdown(by_policy: Mapping[str, Sequence[SanityAnswer]]) -> str:
    """Each sanity prompt with every policy's answer, pass or fail, as markdown."""
    lines = [
        "# Out-of-task sanity prompts (greedy answers)",
        "",
        "An answer passes when it ended and contains the expected text.",
    ]
    prompts = next(iter(by_policy.values()), [])
    for index, first in enumerate(prompts):
        lines += ["", f"## {first.prompt}", "", f"expected: `{first.expected}`", ""]
        lines += ["| policy | passes | answer |", "| --- | :---: | --- |"]
        for name, answers in by_policy.items():
            answer = answers[index]
            text = answer.answer.replace("|", "\\|").replace("\n", " ")
            suffix = "" if answer.ended else " …(no EOS)"
            lines.append(f"| {name} | {'yes' if answer.passed else 'no'} | {text}{suffix} |")
    return "\n".join(lines) + "\n"
