"""The from-scratch Llama: RoPE, GQA attention, and Hugging Face checkpoint round trips."""

import json
import math

import torch
from safetensors.torch import save_file

from conftest import random_model, tiny_config
from model import (Llama, apply_rope, hf_name, load_model, rope_cos_sin, rope_inverse_frequencies,
                   save_checkpoint)


def write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def test_rope_matches_complex_reference():
    config = tiny_config(head_dim=16, rope_theta=500.0)
    T, half = 12, 8
    torch.manual_seed(0)
    x = torch.randn(1, 1, T, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(config, T, "cpu", torch.float64)
    rotated = apply_rope(x, cos, sin)

    # Channel i and i + d_h/2 form the complex number x_i + j x_{i+d_h/2}, turned by m * omega_i.
    omega = 500.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    z = torch.complex(x[..., :half], x[..., half:])
    turn = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.arange(T)[:, None] * omega)
    expected = z * turn
    torch.testing.assert_close(rotated[..., :half], expected.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(rotated[..., half:], expected.imag, rtol=0, atol=1e-6)


def test_rope_llama3_scaling_bands():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = tiny_config(head_dim=32, rope_theta=10000.0, rope_scaling=scaling)
    plain = rope_inverse_frequencies(tiny_config(head_dim=32, rope_theta=10000.0)).double()
    scaled = rope_inverse_frequencies(config).double()
    for base, got in zip(plain.tolist(), scaled.tolist()):
        wavelength = 2 * math.pi / base
        if wavelength < 64 / 4:
            expected = base
        elif wavelength > 64 / 1:
            expected = base / 8
        else:
            smooth = (64 / wavelength - 1) / (4 - 1)
            expected = (1 - smooth) * base / 8 + smooth * base
        assert math.isclose(got, expected, rel_tol=1e-6), (base, got, expected)
    assert (scaled < plain).any()
    assert (scaled == plain).any()


def reference_attention(attn, x, cos, sin):
    """Causal attention with KV heads repeated explicitly (HF's repeat_kv order)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n_rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def test_gqa_attention_matches_repeated_kv_reference():
    for n_kv in (1, 2, 4):
        config = tiny_config(num_key_value_heads=n_kv)
        attn = random_model(config).layers[0].self_attn
        x = torch.randn(2, 10, config.hidden_size)
        cos, sin = rope_cos_sin(config, 10, "cpu", torch.float32)
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin),
                                   rtol=1e-5, atol=1e-5)


def test_gqa_reference_detects_wrong_head_order():
    config = tiny_config()
    attn = random_model(config).layers[0].self_attn
    x = torch.randn(1, 10, config.hidden_size)
    cos, sin = rope_cos_sin(config, 10, "cpu", torch.float32)
    swapped = Llama(config).layers[0].self_attn
    swapped.load_state_dict(attn.state_dict())
    with torch.no_grad():  # exchange the two KV heads of k_proj only
        swapped.k_proj.weight.copy_(attn.k_proj.weight.view(2, 8, -1).flip(0).reshape(16, -1))
    assert (swapped(x, cos, sin) - reference_attention(attn, x, cos, sin)).abs().max() > 1e-3


def test_save_and_load_round_trip(tmp_path, tokens):
    model = random_model(tiny_config())
    write_tokenizer(tmp_path)
    save_checkpoint(model, tmp_path / "ckpt", tmp_path / "tokenizer.json")
    loaded = load_model(str(tmp_path / "ckpt"))
    assert torch.equal(loaded(tokens), model(tokens))
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def write_hf_folder(model, folder, shards=1, tie=False):
    """Write a model in HF layout, split over ``shards`` files with an index when shards > 1."""
    folder.mkdir()
    config = model.config.to_dict()
    config["tie_word_embeddings"] = tie
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    state = {hf_name(n): p.detach().clone() for n, p in model.named_parameters()}
    if tie:
        del state["lm_head.weight"]
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_loads(tmp_path, tokens):
    model = random_model(tiny_config())
    write_hf_folder(model, tmp_path / "sharded", shards=3)
    assert torch.equal(load_model(str(tmp_path / "sharded"))(tokens), model(tokens))


def test_tied_checkpoint_is_untied(tmp_path, tokens):
    model = random_model(tiny_config())
    with torch.no_grad():
        model.lm_head.weight.copy_(model.embed_tokens.weight)
    write_hf_folder(model, tmp_path / "tied", tie=True)
    loaded = load_model(str(tmp_path / "tied"))
    assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.lm_head.weight.data_ptr() != loaded.embed_tokens.weight.data_ptr()
    assert loaded.config.tie_word_embeddings is False


def test_half_precision_files_load(tmp_path, tokens):
    model = random_model(tiny_config())
    for dtype in (torch.float16, torch.bfloat16):
        folder = tmp_path / str(dtype)
        write_hf_folder(model.to(dtype), folder)
        loaded = load_model(str(folder), dtype=torch.float32)
        assert loaded.embed_tokens.weight.dtype == torch.float32
        assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.float())
        model = model.float()
