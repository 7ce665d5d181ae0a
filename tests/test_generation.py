"""Tests for rlhf_core/generation.py: rendering, sampling, EOS cutting, padding, scoring."""

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import FILM_WORDS, word_tokenizer
from torch import nn

from rlhf_core.generation import (
    Rollout,
    SamplingSettings,
    end_token_ids,
    generate,
    render_prompts,
    sequence_logprob_sums,
    truncate_at_eos,
)
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.scoring import score, score_token_ids

WORDS = FILM_WORDS
GREEDY = SamplingSettings(max_new_tokens=6, do_sample=False, batch_size=4)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def pad_is_eos_tokenizer(tokenizer):
    user_tokenizer = copy.deepcopy(tokenizer)
    user_tokenizer.pad_token = user_tokenizer.eos_token
    assert user_tokenizer.pad_token_id == user_tokenizer.eos_token_id
    return user_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_llama("nano", tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    """Seven prompts of different lengths (one with a system turn), so batches need padding."""
    rows = [[{"role": "user", "content": " ".join(WORDS[: 1 + (3 * i) % 7])}] for i in range(6)]
    rows.append(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the plot"}]
    )
    return rows


def with_eos_bias(model, eos_id: int, bias: float):
    """A copy of `model` whose LM head adds `bias` to the EOS logit at every position."""
    biased = copy.deepcopy(model)
    head_bias = torch.zeros(biased.lm_head.out_features)
    head_bias[eos_id] = bias
    biased.lm_head.bias = nn.Parameter(head_bias)
    return biased


def naive_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Argmax decoding by re-running the whole unpadded sequence each step, without a cache."""
    sequence = list(prompt_ids)
    response = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([sequence]), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            sequence.append(token)
            response.append(token)
            if token == eos_id:
                break
    return response


def smallest_eos_gap(model, prompt_ids: list[int], steps: int) -> float:
    """min over greedy steps of (largest logit - EOS logit), on the uncached greedy path."""
    sequence = list(prompt_ids)
    gaps = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0, -1]
            gaps.append(float(logits.max() - logits[model.config.eos_token_id]))
            sequence.append(int(logits.argmax()))
    return min(gaps)


# --- rendering and settings -------------------------------------------------------------------


def test_render_prompts_matches_tokenizing_chat_template(tokenizer, prompts):
    rendered = render_prompts(tokenizer, prompts)
    for prompt, ids in zip(prompts, rendered, strict=True):
        expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
        assert ids == expected
        # every turn is closed by one EOS, and the generation prompt is the assistant token
        assert ids.count(tokenizer.eos_token_id) == len(prompt)
        assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        assert tokenizer.bos_token_id not in ids


def test_render_prompts_without_chat_template_raises(tokenizer, prompts):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render_prompts(plain, prompts)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"batch_size": 0},
        {"do_sample": "yes"},
    ],
)
def test_sampling_settings_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingSettings(**bad)


# --- sampling ---------------------------------------------------------------------------------


def test_same_seed_same_rollout_and_other_seed_differs(model, tokenizer, prompts):
    settings = SamplingSettings(max_new_tokens=8, batch_size=4)
    first = generate(model, tokenizer, prompts, settings, seed=7)
    again = generate(model, tokenizer, prompts, settings, seed=7)
    other = generate(model, tokenizer, prompts, settings, seed=8)
    assert first == again
    assert first.response_ids != other.response_ids
    assert first.prompt_ids == render_prompts(tokenizer, prompts)


def test_generate_leaves_caller_rng_untouched(model, tokenizer, prompts):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=4), seed=0)
    assert torch.equal(torch.rand(3), expected_next)


def test_sampling_is_set_by_settings_not_by_the_models_generation_config(model, tokenizer, prompts):
    biased = with_eos_bias(model, tokenizer.eos_token_id, 3.5)  # so that min lengths matter
    settings = SamplingSettings(max_new_tokens=8, batch_size=4)
    expected = generate(biased, tokenizer, prompts, settings, seed=5)
    assert any(expected.ended)
    opinionated = copy.deepcopy(biased)
    config = opinionated.generation_config
    config.do_sample, config.temperature, config.top_k = False, 0.1, 3
    config.repetition_penalty, config.no_repeat_ngram_size, config.min_new_tokens = 5.0, 1, 8
    assert generate(opinionated, tokenizer, prompts, settings, seed=5) == expected


def test_top_k_one_sampling_equals_greedy(model, tokenizer, prompts):
    top_one = SamplingSettings(max_new_tokens=6, top_k=1, batch_size=4)
    assert generate(model, tokenizer, prompts, top_one, seed=9) == generate(
        model, tokenizer, prompts, GREEDY, seed=0
    )


def test_greedy_is_independent_of_batch_size_and_order(model, tokenizer, prompts):
    one_by_one = generate(model, tokenizer, prompts, replace(GREEDY, batch_size=1), seed=0)
    assert generate(model, tokenizer, prompts, GREEDY, seed=0) == one_by_one
    reversed_rollout = generate(model, tokenizer, prompts[::-1], GREEDY, seed=0)
    assert reversed_rollout.response_ids == one_by_one.response_ids[::-1]


def test_progress_bar_does_not_change_the_rollout(model, tokenizer, prompts):
    expected = generate(model, tokenizer, prompts, GREEDY, seed=0)
    assert generate(model, tokenizer, prompts, GREEDY, seed=0, progress=True) == expected


def test_greedy_matches_naive_uncached_loop(model, tokenizer, prompts):
    rollout = generate(model, tokenizer, prompts, GREEDY, seed=0)
    for prompt_ids, response_ids in zip(rollout.prompt_ids, rollout.response_ids, strict=True):
        expected = naive_greedy(model, prompt_ids, GREEDY.max_new_tokens, tokenizer.eos_token_id)
        assert response_ids == expected


def test_greedy_with_eos_bias_matches_naive_loop_that_stops_at_eos(model, tokenizer, prompts):
    # Adding b to the EOS logit leaves the argmax path unchanged until EOS wins, so prompt i
    # ends within the limit iff b exceeds its smallest (best logit - EOS logit) gap along the
    # unbiased greedy path. A bias between the smallest and largest such gap ends some prompts.
    eos_id = tokenizer.eos_token_id
    gaps = [
        smallest_eos_gap(model, ids, GREEDY.max_new_tokens)
        for ids in render_prompts(tokenizer, prompts)
    ]
    assert min(gaps) < max(gaps)
    biased = with_eos_bias(model, eos_id, (min(gaps) + max(gaps)) / 2)
    rollout = generate(biased, tokenizer, prompts, GREEDY, seed=0)
    for prompt_ids, response_ids in zip(rollout.prompt_ids, rollout.response_ids, strict=True):
        assert response_ids == naive_greedy(biased, prompt_ids, GREEDY.max_new_tokens, eos_id)
    assert any(rollout.ended) and not all(rollout.ended)
    for response, ended in zip(rollout.response_ids, rollout.ended, strict=True):
        assert (response[-1] == eos_id) == ended


def test_sampled_responses_are_cut_at_first_eos(model, tokenizer, prompts):
    eos_id = tokenizer.eos_token_id
    biased = with_eos_bias(model, eos_id, 3.5)  # EOS about 10% per step
    settings = SamplingSettings(max_new_tokens=10, batch_size=8)
    rollout = generate(biased, tokenizer, prompts * 3, settings, seed=0)
    assert any(rollout.ended) and not all(rollout.ended)
    for response, ended in zip(rollout.response_ids, rollout.ended, strict=True):
        assert response.count(eos_id) == (1 if ended else 0)
        if ended:
            assert response[-1] == eos_id
        else:
            assert len(response) == settings.max_new_tokens


def test_always_eos_model_gives_one_token_empty_responses(model, tokenizer, prompts):
    biased = with_eos_bias(model, tokenizer.eos_token_id, 100.0)
    rollout = generate(biased, tokenizer, prompts, SamplingSettings(max_new_tokens=5), seed=0)
    assert rollout.response_ids == [[tokenizer.eos_token_id]] * len(prompts)
    assert rollout.ended == [True] * len(prompts)
    assert rollout.texts == [""] * len(prompts)


def test_pad_equal_to_eos_gives_the_same_rollout(model, tokenizer, pad_is_eos_tokenizer, prompts):
    # The prompts contain <|end|> tokens, which must not be mistaken for padding.
    biased = with_eos_bias(model, tokenizer.eos_token_id, 3.5)
    settings = SamplingSettings(max_new_tokens=10, batch_size=4)
    expected = generate(biased, tokenizer, prompts, settings, seed=3)
    rollout = generate(biased, pad_is_eos_tokenizer, prompts, settings, seed=3)
    assert rollout == expected
    assert any(rollout.ended) and not all(rollout.ended)


def test_cutting_of_generate_output_with_pad_equal_to_eos(
    model, pad_is_eos_tokenizer, prompts, monkeypatch
):
    """`model.generate` returns planned continuations; check what `generate` makes of them."""
    eos = pad_is_eos_tokenizer.eos_token_id
    word = pad_is_eos_tokenizer.convert_tokens_to_ids("Ġfilm")
    # after EOS, HF pads with pad_token_id, which here is EOS again
    planned = [
        ([word, eos, eos, eos], [word, eos], True),
        ([eos, eos, eos, eos], [eos], True),
        ([word, word, word, eos], [word, word, word, eos], True),
        ([word, word, word, word], [word, word, word, word], False),
    ]
    chosen_prompts = prompts[:4]
    plan_by_prompt = {
        tuple(ids): continuation
        for ids, (continuation, _, _) in zip(
            render_prompts(pad_is_eos_tokenizer, chosen_prompts), planned, strict=True
        )
    }

    def planned_generate(input_ids, attention_mask, generation_config):
        rows = [
            plan_by_prompt[tuple(row[mask.bool()].tolist())]
            for row, mask in zip(input_ids, attention_mask, strict=True)
        ]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(model, "generate", planned_generate)
    rollout = generate(
        model, pad_is_eos_tokenizer, chosen_prompts, SamplingSettings(max_new_tokens=4), seed=0
    )
    assert rollout.response_ids == [expected for _, expected, _ in planned]
    assert rollout.ended == [ended for _, _, ended in planned]
    assert rollout.texts == ["film", "", "film film film", "film film film film"]


def test_truncate_at_eos():
    assert truncate_at_eos([5, 2, 7, 2], eos_ids=2) == ([5, 2], True)
    assert truncate_at_eos([5, 7], eos_ids=2) == ([5, 7], False)
    assert truncate_at_eos([5, 9, 7, 2], eos_ids=[2, 9]) == ([5, 9], True)


def test_generation_stops_on_every_end_id_of_the_models_generation_config(
    model, tokenizer, prompts
):
    """A model whose turns end with another id than the tokenizer's EOS (Llama 3's
    `<|eot_id|>`) lists it in `generation_config.eos_token_id`: responses end there."""
    free = generate(model, tokenizer, prompts[:1], GREEDY, seed=0)
    end_of_turn = free.response_ids[0][0]  # what greedy decoding says first
    assert end_of_turn != tokenizer.eos_token_id and len(free.response_ids[0]) > 1
    turn_model = copy.deepcopy(model)
    turn_model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    assert end_token_ids(tokenizer, turn_model) == [tokenizer.eos_token_id, end_of_turn]
    assert end_token_ids(tokenizer) == [tokenizer.eos_token_id]
    stopped = generate(turn_model, tokenizer, prompts[:1], GREEDY, seed=0)
    assert stopped.response_ids[0] == [end_of_turn]
    assert stopped.ended == [True]


def test_policy_with_value_head_samples_like_its_lm_and_modes_are_restored(
    model, tokenizer, prompts
):
    policy = PolicyWithValueHead(copy.deepcopy(model))
    policy.train()
    policy.lm.model.layers[0].eval()  # mixed modes must come back as they were
    modes_before = [module.training for module in policy.modules()]
    expected = generate(model, tokenizer, prompts, GREEDY, seed=0)
    assert generate(policy, tokenizer, prompts, GREEDY, seed=0) == expected
    assert [module.training for module in policy.modules()] == modes_before


def test_generate_needs_a_pad_token(model, tokenizer, prompts):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate(model, no_pad, prompts, GREEDY, seed=0)


# --- padding ----------------------------------------------------------------------------------


def test_to_padded_masks_and_alignment(model, tokenizer, prompts):
    biased = with_eos_bias(model, tokenizer.eos_token_id, 3.5)  # responses of several lengths
    rollout = generate(biased, tokenizer, prompts, SamplingSettings(max_new_tokens=10), seed=1)
    assert len({len(ids) for ids in rollout.response_ids}) > 1
    padded = rollout.to_padded(pad_id=tokenizer.pad_token_id)
    width = padded["prompt_width"]
    assert width == max(len(ids) for ids in rollout.prompt_ids)
    total = width + max(len(ids) for ids in rollout.response_ids)
    for key in ("input_ids", "attention_mask", "response_mask"):
        assert padded[key].shape == (len(prompts), total)
    for row, (prompt, response) in enumerate(
        zip(rollout.prompt_ids, rollout.response_ids, strict=True)
    ):
        input_ids = padded["input_ids"][row]
        attention = padded["attention_mask"][row].bool()
        response_mask = padded["response_mask"][row].bool()
        assert input_ids[response_mask].tolist() == response
        assert input_ids[attention & ~response_mask].tolist() == prompt
        assert input_ids[width : width + len(response)].tolist() == response  # starts at P
        assert input_ids[width - len(prompt) : width].tolist() == prompt  # ends at P - 1
        assert not (response_mask & ~attention).any()


def test_rollout_rejects_fields_of_different_lengths():
    with pytest.raises(ValueError, match="one entry per prompt"):
        Rollout(prompt_ids=[[1]], response_ids=[[2], [3]], ended=[True], texts=["a"])


# --- scoring ----------------------------------------------------------------------------------


def test_score_matches_scoring_each_conversation_alone(reward_model, tokenizer, prompts):
    responses = [
        "great film",
        "",
        "the plot was dull and the actor was bad",
        "good",
        "x",
        "bad",
        "ok",
    ]
    scores = score(reward_model, tokenizer, prompts, responses, batch_size=3)
    assert scores.dtype == torch.float32 and scores.shape == (len(prompts),)
    assert not scores.is_inference()  # usable in autograd math (e.g. PPO advantages)
    for index, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        conversation = [*prompt, {"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(conversation)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        with torch.no_grad():
            alone = reward_model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(scores[index], alone[0], atol=1e-5, rtol=1e-5)
    assert len(set(scores.tolist())) == len(prompts)


def test_score_needs_one_response_per_prompt(reward_model, tokenizer, prompts):
    with pytest.raises(ValueError, match="one response per prompt"):
        score(reward_model, tokenizer, prompts, ["only one"])


def test_score_token_ids_matches_per_sequence_calls(reward_model, model, tokenizer, prompts):
    rollout = generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=6), seed=2)
    sequences = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids, strict=True)]
    scores = score_token_ids(reward_model, sequences, tokenizer.pad_token_id, batch_size=2)
    with torch.no_grad():
        expected = torch.cat(
            [
                reward_model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
                for ids in sequences
            ]
        )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        score_token_ids(reward_model, [[3, 4], []], tokenizer.pad_token_id)


# --- sequence log-probabilities ---------------------------------------------------------------


def test_sequence_logprob_sums_match_per_example_loop(model, tokenizer, prompts):
    biased = with_eos_bias(model, tokenizer.eos_token_id, 3.5)  # responses of several lengths
    rollout = generate(biased, tokenizer, prompts, SamplingSettings(max_new_tokens=8), seed=4)
    expected = []
    with torch.no_grad():
        for prompt, response in zip(rollout.prompt_ids, rollout.response_ids, strict=True):
            ids = torch.tensor([prompt + response])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            token_log_probs = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
            expected.append(token_log_probs[len(prompt) - 1 :].sum())
    expected = torch.stack(expected)
    from_rollout = sequence_logprob_sums(model, rollout, batch_size=3)
    from_padded = sequence_logprob_sums(model, rollout.to_padded(tokenizer.pad_token_id), 3)
    from_policy = sequence_logprob_sums(PolicyWithValueHead(model), rollout, batch_size=64)
    for result in (from_rollout, from_padded, from_policy):
        assert result.dtype == torch.float32 and result.shape == (len(prompts),)
        assert not result.is_inference()
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-5)


def test_sequence_logprob_sums_reject_response_without_context(model):
    padded = {
        "input_ids": torch.tensor([[7, 8]]),
        "attention_mask": torch.tensor([[1, 1]]),
        "response_mask": torch.tensor([[1, 1]]),
    }
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob_sums(model, padded)
