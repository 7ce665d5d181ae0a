"""Tests for rlhf_core/models/heads.py: pooling indices, reward model, policy with value head."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import word_tokenizer
from transformers import GPT2Config, GPT2Model

from rlhf_core.models.heads import (
    PolicyWithValueHead,
    RewardModel,
    init_scalar_head,
    last_token_index,
    position_ids_from_mask,
)
from rlhf_core.models.loading import load_causal_lm, load_tokenizer
from rlhf_core.models.tiny import build_tiny_llama

SEQUENCE_LENGTHS = (3, 6, 9)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def causal_lm(tokenizer):
    return build_tiny_llama("nano", tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    first_plain_id = 6  # ids 0-5 are special tokens
    return [
        torch.randint(first_plain_id, len(tokenizer), (length,), generator=generator)
        for length in SEQUENCE_LENGTHS
    ]


def pad_batch(sequences, pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-loop padding: `(input_ids, attention_mask)`, each (batch, max_len)."""
    width = max(len(s) for s in sequences)
    rows, masks = [], []
    for sequence in sequences:
        padding = [pad_id] * (width - len(sequence))
        tokens = sequence.tolist()
        ones, zeros = [1] * len(tokens), [0] * len(padding)
        rows.append(tokens + padding if side == "right" else padding + tokens)
        masks.append(ones + zeros if side == "right" else zeros + ones)
    return torch.tensor(rows), torch.tensor(masks)


# --- index helpers --------------------------------------------------------------------------------

masks_strategy = st.integers(1, 6).flatmap(
    lambda width: st.lists(
        st.lists(st.integers(0, 1), min_size=width, max_size=width).filter(any),
        min_size=1,
        max_size=4,
    )
)


@settings(max_examples=50, deadline=None)
@given(mask_rows=masks_strategy)
def test_last_token_index_matches_loop_reference(mask_rows):
    expected = []
    for row in mask_rows:
        last = None
        for position, value in enumerate(row):
            if value == 1:
                last = position
        expected.append(last)
    assert last_token_index(torch.tensor(mask_rows)).tolist() == expected


@settings(max_examples=50, deadline=None)
@given(mask_rows=masks_strategy)
def test_position_ids_match_loop_reference(mask_rows):
    expected = []
    for row in mask_rows:
        seen, positions = 0, []
        for value in row:
            seen += value
            positions.append(max(seen - 1, 0))
        expected.append(positions)
    assert position_ids_from_mask(torch.tensor(mask_rows)).tolist() == expected


def test_index_helpers_on_the_three_padding_layouts():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    assert position_ids_from_mask(mask).tolist() == [
        [0, 1, 2, 2, 2],
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
    ]
    assert last_token_index(mask).dtype == torch.long


def test_last_token_index_rejects_empty_row():
    with pytest.raises(ValueError, match="no tokens"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_scalar_head_init_is_seeded_small_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected_draw = torch.rand(2)
    torch.manual_seed(5)
    head = init_scalar_head(10_000, seed=3)
    assert torch.equal(torch.rand(2), expected_draw)
    assert torch.equal(head.weight, init_scalar_head(10_000, seed=3).weight)
    assert not torch.equal(head.weight, init_scalar_head(10_000, seed=4).weight)
    assert torch.equal(head.bias, torch.zeros(1))
    assert abs(head.weight.std().item() * (10_001**0.5) - 1.0) < 0.05


# --- reward model ---------------------------------------------------------------------------------


def test_reward_model_from_causal_lm_drops_lm_head(tokenizer):
    causal_lm = build_tiny_llama("nano", tokenizer, seed=1)
    model = RewardModel.from_causal_lm(causal_lm, seed=0)
    assert model.backbone is causal_lm.model
    assert not any("lm_head" in name for name, _ in model.named_parameters())
    assert model.score.weight.shape == (1, causal_lm.config.hidden_size)
    assert torch.equal(model.score.bias, torch.zeros(1))


def test_rewards_are_float32_per_sequence_and_differentiable(reward_model, tokenizer, sequences):
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "right")
    rewards = reward_model(ids, mask)
    assert rewards.shape == (len(sequences),)
    assert rewards.dtype == torch.float32
    rewards.sum().backward()
    assert reward_model.score.weight.grad is not None
    assert reward_model.backbone.embed_tokens.weight.grad is not None
    reward_model.zero_grad(set_to_none=True)


def test_reward_is_the_same_for_left_right_and_no_padding(reward_model, tokenizer, sequences):
    with torch.no_grad():
        unpadded = torch.stack([reward_model(s[None], torch.ones(1, len(s)))[0] for s in sequences])
        right = reward_model(*pad_batch(sequences, tokenizer.pad_token_id, "right"))
        left = reward_model(*pad_batch(sequences, tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right, unpadded, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, unpadded, rtol=0, atol=1e-5)
    assert (unpadded.max() - unpadded.min()) > 1e-3  # sequences really score differently


def test_wrong_pooling_index_would_change_the_reward(reward_model, tokenizer, sequences):
    """The padding test above can fail: these are the answers of the usual pooling mistakes."""
    with torch.no_grad():
        correct = torch.stack([reward_model(s[None], torch.ones(1, len(s)))[0] for s in sequences])
        backbone, score = reward_model.backbone, reward_model.score

        right_ids, right_mask = pad_batch(sequences, tokenizer.pad_token_id, "right")
        hidden = backbone(input_ids=right_ids, attention_mask=right_mask).last_hidden_state
        last_column = score(hidden[:, -1]).squeeze(-1)
        assert (last_column[:2] - correct[:2]).abs().min() > 1e-3

        left_ids, left_mask = pad_batch(sequences, tokenizer.pad_token_id, "left")
        hidden = backbone(input_ids=left_ids, attention_mask=left_mask).last_hidden_state
        rows = torch.arange(len(sequences))
        length_minus_one = score(hidden[rows, left_mask.sum(-1) - 1]).squeeze(-1)
        assert (length_minus_one[:2] - correct[:2]).abs().min() > 1e-3


def test_position_ids_from_the_mask_are_passed_to_the_backbone(reward_model, tokenizer, sequences):
    seen = {}

    def record(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"]

    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "left")
    handle = reward_model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            reward_model(ids, mask)
    finally:
        handle.remove()
    assert torch.equal(seen["position_ids"], position_ids_from_mask(mask))


@pytest.fixture(scope="module")
def absolute_position_reward_model(tokenizer):
    """A GPT-2 backbone: learned absolute positions, so left padding shifts them unless the
    position ids come from the mask (Llama's RoPE is relative and would not notice)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = GPT2Model(config).eval()
    return RewardModel(backbone, seed=0).eval()


def test_left_padding_with_absolute_positions(absolute_position_reward_model, tokenizer, sequences):
    model = absolute_position_reward_model
    with torch.no_grad():
        unpadded = torch.stack([model(s[None], torch.ones(1, len(s)))[0] for s in sequences])
        left_ids, left_mask = pad_batch(sequences, tokenizer.pad_token_id, "left")
        left = model(left_ids, left_mask)
        right = model(*pad_batch(sequences, tokenizer.pad_token_id, "right"))
        hidden = model.backbone(input_ids=left_ids, attention_mask=left_mask).last_hidden_state
        without_position_ids = model.score(hidden[:, -1]).squeeze(-1)
    torch.testing.assert_close(left, unpadded, rtol=0, atol=1e-5)
    torch.testing.assert_close(right, unpadded, rtol=0, atol=1e-5)
    assert (without_position_ids[:2] - unpadded[:2]).abs().min() > 1e-3


def test_reward_ignores_what_the_pad_id_is(reward_model, tokenizer, sequences):
    """Works for user tokenizers whose pad is their EOS: only the attention mask matters."""
    with torch.no_grad():
        for side in ("left", "right"):
            with_pad = reward_model(*pad_batch(sequences, tokenizer.pad_token_id, side))
            with_eos = reward_model(*pad_batch(sequences, tokenizer.eos_token_id, side))
            torch.testing.assert_close(with_eos, with_pad, rtol=0, atol=1e-5)


def test_reward_model_round_trip_is_exact(reward_model, tokenizer, sequences, tmp_path):
    path = tmp_path / "reward"
    reward_model.save_pretrained(path, tokenizer=tokenizer)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "score_head.safetensors", "reward_model.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    meta = json.loads((path / "reward_model.json").read_text())
    assert meta["hidden_size"] == reward_model.score.in_features
    assert meta["pooling"] == "last_token"

    loaded = RewardModel.from_pretrained(path)
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "left")
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), reward_model(ids, mask))
    assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()


def test_reward_model_loaded_in_bfloat16_still_returns_float32(
    reward_model, tokenizer, sequences, tmp_path
):
    reward_model.save_pretrained(tmp_path / "reward")
    loaded = RewardModel.from_pretrained(tmp_path / "reward", dtype=torch.bfloat16)
    assert loaded.backbone.dtype == torch.bfloat16
    with torch.no_grad():
        rewards = loaded(*pad_batch(sequences, tokenizer.pad_token_id, "right"))
    assert rewards.dtype == torch.float32


# --- policy with value head ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(causal_lm):
    return PolicyWithValueHead(causal_lm, seed=0)


def test_policy_forward_matches_lm_and_value_head(policy, causal_lm, sequences):
    ids = sequences[2][None]  # (1, 9)
    with torch.no_grad():
        logits, values = policy(ids, torch.ones_like(ids))
        expected_logits = causal_lm(ids).logits
        last_hidden = causal_lm.model(ids).last_hidden_state
        expected_values = policy.value_head(last_hidden).squeeze(-1)
    assert policy.lm is causal_lm
    assert logits.shape == (1, 9, causal_lm.config.vocab_size)
    assert values.shape == (1, 9) and values.dtype == torch.float32
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)


def test_policy_outputs_do_not_depend_on_padding_side(policy, tokenizer, sequences):
    with torch.no_grad():
        unpadded = [policy(s[None], torch.ones(1, len(s))) for s in sequences]
        for side in ("left", "right"):
            ids, mask = pad_batch(sequences, tokenizer.pad_token_id, side)
            logits, values = policy(ids, mask)
            for row, (expected_logits, expected_values) in enumerate(unpadded):
                real = mask[row].bool()
                torch.testing.assert_close(logits[row][real], expected_logits[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(values[row][real], expected_values[0], rtol=0, atol=1e-5)


def test_policy_generate_delegates_to_lm(policy, causal_lm, tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the film"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    generated = policy.generate(**prompt, **kwargs)
    assert torch.equal(generated, causal_lm.generate(**prompt, **kwargs))
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_policy_round_trip_is_exact(policy, tokenizer, sequences, tmp_path):
    path = tmp_path / "policy"
    policy.save_pretrained(path, tokenizer=tokenizer)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "value_head.safetensors", "value_head.json"} <= names

    loaded = PolicyWithValueHead.from_pretrained(path)
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "left")
    with torch.no_grad():
        logits, values = policy(ids, mask)
        loaded_logits, loaded_values = loaded(ids, mask)
        assert torch.equal(loaded_logits, logits)
        assert torch.equal(loaded_values, values)

        lm_only, _ = load_causal_lm(path)
        assert torch.equal(lm_only(sequences[0][None]).logits, policy.lm(sequences[0][None]).logits)


def test_loading_the_wrong_kind_of_directory_is_refused(policy, reward_model, tmp_path):
    policy.save_pretrained(tmp_path / "policy")
    reward_model.save_pretrained(tmp_path / "reward")
    with pytest.raises(FileNotFoundError, match=r"reward_model\.json"):
        RewardModel.from_pretrained(tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match=r"value_head\.json"):
        PolicyWithValueHead.from_pretrained(tmp_path / "reward")


def test_disable_dropout_makes_training_mode_deterministic(tokenizer):
    from tiny_models import two_layer_llama

    from rlhf_core.models.heads import disable_dropout

    model = two_layer_llama(len(tokenizer), attention_dropout=0.5).train()
    ids = torch.tensor([tokenizer.encode("the film was great and the plot was good")])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on
        assert disable_dropout(model) == 2  # one attention module per layer
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert model.config.attention_dropout == 0.0 and disable_dropout(model) == 0
