"""One scoring path on a ChatML model: the reward model reads the token it was trained on.

ChatML (SmolLM2, Qwen) closes a turn with `<|im_end|>` followed by a newline. A reward model is
trained on prompt + response + EOS; scoring a re-rendered full conversation instead reads the
score at the newline. Built here on a nano model with a ChatML template and `<|im_end|>` as EOS.
"""

import random

import pandas as pd
import pytest
import torch
from tiny_models import FILM_WORDS, word_tokenizer

from rlhf_core.evaluation.comparison import ResponseJudge, reward_model_metrics
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.scoring import score
from rlhf_core.stages.reward import pair_groups
from rlhf_core.training.objectives.reward import RewardObjective
from rlhf_core.training.tokenize import tokenize_completion

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def chatml_reward_model(chatml_tokenizer):
    torch.manual_seed(0)
    return RewardModel.from_causal_lm(
        build_tiny_llama("nano", chatml_tokenizer, seed=1), seed=0
    ).eval()


@pytest.fixture(scope="module")
def pairs():
    rng = random.Random(3)

    def sentence():
        return " ".join(rng.choice(FILM_WORDS) for _ in range(rng.randint(2, 8)))

    rows = [
        {
            "prompt": [{"role": "user", "content": sentence()}],
            "chosen": sentence(),
            "rejected": sentence(),
        }
        for _ in range(32)
    ]
    return pd.DataFrame(rows)


def test_a_full_chatml_rendering_ends_after_the_eos(chatml_tokenizer):
    """The trap: the template writes a newline after `<|im_end|>`."""
    conversation = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "ok"}]
    ids = chatml_tokenizer.apply_chat_template(conversation)["input_ids"]
    assert ids[-2] == chatml_tokenizer.eos_token_id and ids[-1] != chatml_tokenizer.eos_token_id


def test_scores_are_read_at_the_token_the_reward_model_was_trained_on(
    chatml_tokenizer, chatml_reward_model, pairs
):
    prompts, responses = list(pairs["prompt"]), list(pairs["chosen"])
    scores = score(chatml_reward_model, chatml_tokenizer, prompts, responses)
    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        trained_on = tokenize_completion(chatml_tokenizer, prompt, response, 256).input_ids
        assert trained_on[-1] == chatml_tokenizer.eos_token_id
        with torch.no_grad():
            expected = chatml_reward_model(
                torch.tensor([trained_on]), torch.ones(1, len(trained_on), dtype=torch.long)
            )
        torch.testing.assert_close(scores[index], expected[0], atol=1e-5, rtol=1e-5)


def test_an_unfinished_response_is_scored_without_the_eos(
    chatml_tokenizer, chatml_reward_model, pairs
):
    prompts, responses = list(pairs["prompt"][:4]), list(pairs["chosen"][:4])
    ended = [True, False, True, False]
    scores = score(chatml_reward_model, chatml_tokenizer, prompts, responses, ended=ended)
    finished = score(chatml_reward_model, chatml_tokenizer, prompts, responses)
    assert torch.equal(scores[[0, 2]], finished[[0, 2]])
    assert not torch.isclose(scores[1], finished[1]) and not torch.isclose(scores[3], finished[3])


def test_reward_accuracy_in_the_reward_stage_equals_the_one_in_evaluation(
    chatml_tokenizer, chatml_reward_model, pairs
):
    groups = pair_groups(chatml_tokenizer, pairs, 256, use_margin=False)
    objective = RewardObjective(groups, groups, chatml_tokenizer.pad_token_id, use_margin=False)
    in_training = objective.evaluate(chatml_reward_model)
    judge = ResponseJudge(chatml_reward_model, chatml_tokenizer, None, batch_size=8)
    in_evaluation = reward_model_metrics(judge, pairs)
    assert 0.0 < in_training["eval_accuracy"] < 1.0  # an untrained model: a mixed result
    assert in_evaluation["eval_accuracy"] == pytest.approx(in_training["eval_accuracy"])
    assert in_evaluation["eval_margin_mean"] == pytest.approx(
        in_training["eval_margin_mean"], abs=1e-5
    )


def test_the_eos_must_close_an_assistant_turn(chatml_tokenizer):
    from rlhf_core.models.tokenizer import eos_closes_assistant_turn

    assert eos_closes_assistant_turn(chatml_tokenizer)
    assert eos_closes_assistant_turn(word_tokenizer())  # the demo's own template
    other_end = word_tokenizer()
    other_end.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    other_end.chat_template = CHATML.replace("<|im_end|>", "<|eot|>")  # turns end with <|eot|>
    assert not eos_closes_assistant_turn(other_end)
