"""Out-of-task sanity answers: when one passes, and how the report shows them."""

import pytest

from rlhf_core.evaluation.sanity import SanityAnswer, pass_fraction, sanity_markdown

QUESTION = "What is the capital of France?"


@pytest.mark.parametrize(
    ("answer", "ended", "passed"),
    [
        ("The capital of France is Paris.", True, True),
        ("PARIS", True, True),  # case-insensitive
        ("The capital of France is Paris and", False, False),  # never ended
        ("The film was great.", True, False),  # a movie review instead
    ],
)
def test_an_answer_passes_when_it_ended_and_contains_the_expected_text(answer, ended, passed):
    assert SanityAnswer(QUESTION, "Paris", answer, ended).passed is passed


def test_pass_fraction_and_report():
    by_policy = {
        "sft": [SanityAnswer(QUESTION, "Paris", "Paris.", True)],
        "dpo": [SanityAnswer(QUESTION, "Paris", "A | great film", False)],
    }
    assert pass_fraction(by_policy["sft"]) == 1.0
    assert pass_fraction(by_policy["dpo"]) == 0.0
    with pytest.raises(ValueError):
        pass_fraction([])
    report = sanity_markdown(by_policy)
    assert f"## {QUESTION}" in report
    assert "| sft | yes | Paris. |" in report
    assert "| dpo | no | A \\| great film …(no EOS) |" in report
