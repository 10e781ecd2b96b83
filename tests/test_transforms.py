"""Every FPTQuant transform leaves the full-precision function unchanged, online and merged.

The models run in float64 so that a tolerance of 1e-9 separates float rounding from real
mistakes: a transposed matrix, a wrong GQA head order or a wrong RoPE pairing change the logits
by more than 1e-3.
"""

import copy
import math

import pytest
import torch

from conftest import random_model, tiny_config
from fptquant import (TRANSFORM_NAMES, PreRopeTransform, Transforms, ValueTransform, fold_norms,
                      install_online, merge, random_orthogonal, turn_pairs)
from model import apply_rope, load_model, rope_cos_sin, save_checkpoint
from test_model import write_tokenizer

CONFIGS = {"mha": tiny_config(num_key_value_heads=4), "gqa": tiny_config(num_key_value_heads=2)}


def randomize(transforms: Transforms, seed: int = 1) -> Transforms:
    """Give every transform parameter a random, clearly non-identity value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if transforms.rotation is not None:
            R = transforms.rotation.matrix
            transforms.rotation.matrix = random_orthogonal(R.shape[0], generator).to(R.dtype)
        for tk in transforms.pre_rope or []:
            tk.log_scale.normal_(0, 0.5, generator=generator)
            tk.angle.uniform_(-math.pi, math.pi, generator=generator)
        for tv in transforms.value or []:
            heads, dim, _ = tv.left.shape
            tv.left = torch.stack([random_orthogonal(dim, generator) for _ in range(heads)]).to(tv.left.dtype)
            tv.right = torch.stack([random_orthogonal(dim, generator) for _ in range(heads)]).to(tv.left.dtype)
            tv.raw_log_scale.normal_(0, 0.7, generator=generator)
        for tu in transforms.mlp_scale or []:
            tu.log_scale.normal_(0, 0.5, generator=generator)
    return transforms


def folded_model(config):
    model = random_model(config).double()
    fold_norms(model)
    return model


def assert_same_logits(actual, expected, tol=1e-9):
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= tol * scale


@pytest.mark.parametrize("kind", CONFIGS)
def test_fold_norms_keeps_logits(kind, tokens):
    model = random_model(CONFIGS[kind]).double()
    reference = model(tokens)
    fold_norms(model)
    assert_same_logits(model(tokens), reference)
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in model.layers)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_merged_transform_keeps_logits(kind, name, tokens):
    model = folded_model(CONFIGS[kind])
    reference = model(tokens)
    transforms = randomize(Transforms(model.config, enabled=[name]).double())
    merge(model, transforms)
    assert_same_logits(model(tokens), reference)


@pytest.mark.parametrize("kind", CONFIGS)
def test_all_transforms_merged_keep_logits(kind, tokens):
    model = folded_model(CONFIGS[kind])
    reference = model(tokens)
    merge(model, randomize(Transforms(model.config).double()))
    assert_same_logits(model(tokens), reference)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("name", ["tk", "tv", "tu"])
def test_online_transform_keeps_logits(kind, name, tokens):
    model = folded_model(CONFIGS[kind])
    reference = model(tokens)
    install_online(model, randomize(Transforms(model.config, enabled=[name]).double()))
    assert_same_logits(model(tokens), reference)


@pytest.mark.parametrize("kind", CONFIGS)
def test_merged_equals_online(kind, tokens):
    """The merge formulas (weights) and the online face (activations) change the same tensors."""
    config = CONFIGS[kind]
    transforms = randomize(Transforms(config, enabled=["tk", "tv", "tu"]).double())
    online, merged = folded_model(config), folded_model(config)
    install_online(online, transforms)
    merge(merged, transforms)

    keys = {}
    for label, model in (("online", online), ("merged", merged)):
        model.layers[0].self_attn.key_quantizer = lambda k, label=label: keys.setdefault(label, k)
        model(tokens)
    assert_same_logits(keys["merged"], keys["online"])
    assert_same_logits(merged(tokens), online(tokens))


def test_merge_changes_the_weights():
    model = folded_model(CONFIGS["gqa"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    merge(model, randomize(Transforms(model.config).double()))
    for name, param in model.named_parameters():
        if name.endswith("proj.weight") or name in ("embed_tokens.weight", "lm_head.weight"):
            assert (param - before[name]).abs().max() > 1e-3, name


def rope_scores(q, k, positions, config):
    """q_m . k_n after RoPE for every pair of positions, (H, T, T)."""
    cos, sin = rope_cos_sin(config, max(positions) + 1, "cpu", torch.float64)
    q, k = apply_rope(q, cos[positions], sin[positions]), apply_rope(k, cos[positions], sin[positions])
    return q @ k.transpose(-1, -2)


def test_pre_rope_transform_commutes_with_rope():
    config = tiny_config(num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    tk = PreRopeTransform(2, 2, 8).double()
    with torch.no_grad():
        tk.log_scale.normal_(0, 0.5)
        tk.angle.uniform_(-math.pi, math.pi)
    q, k = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    positions = [0, 1, 5, 17, 40, 63]
    reference = rope_scores(q, k, positions, config)

    q_t, k_t = tk(q[None], k[None])
    assert_same_logits(rope_scores(q_t[0], k_t[0], positions, config), reference)

    # The plain inverse s^-1 R(-theta) on queries is wrong: it leaves a rotation by 2 theta.
    scale, angle = tk.query_params()
    q_wrong = turn_pairs(q, scale, -angle)
    error = (rope_scores(q_wrong, k_t[0], positions, config) - reference).abs().max()
    assert error > 1e-2 * reference.abs().max()


def test_value_transform_stays_well_conditioned():
    tv = ValueTransform(4, 2, 8, max_condition=100.0).double()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            for param in tv.parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 5)
        matrix = tv.matrix()
        condition = torch.linalg.cond(matrix)
        assert condition.max() <= 100.0 * (1 + 1e-9)
        eye = torch.eye(8, dtype=torch.float64).expand_as(matrix)
        torch.testing.assert_close(matrix @ tv.inverse(), eye, rtol=0, atol=1e-10)


def test_residual_rotation_is_orthogonal_after_updates():
    transforms = Transforms(tiny_config(), enabled=["rotation"])
    with torch.no_grad():
        for param in transforms.parameters():
            param.add_(torch.randn_like(param))
    R = transforms.rotation.matrix.double()
    torch.testing.assert_close(R @ R.T, torch.eye(R.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)


def test_dynamic_scaling_exact_with_massive_activation(tokens):
    model = folded_model(CONFIGS["gqa"])
    with torch.no_grad():  # token 0 gets a residual norm about 1000 times the others
        model.embed_tokens.weight[0] *= 1000
    tokens = tokens.clone()
    tokens[:, 0] = 0
    reference = model(tokens)

    down_inputs = {}
    model.layers[1].mlp.down_input_quantizer = lambda h: down_inputs.setdefault("sn", h)
    model.dynamic_scaling = True
    assert_same_logits(model(tokens), reference)
    assert down_inputs["sn"][:, 0].abs().max() < 1e-2 * down_inputs["sn"][:, 1:].abs().max()


def test_merged_checkpoint_round_trip(tmp_path, tokens):
    model = folded_model(CONFIGS["gqa"]).float()
    reference = model(tokens)
    merge(model, randomize(Transforms(model.config)))
    write_tokenizer(tmp_path)
    save_checkpoint(model, tmp_path / "merged", tmp_path / "tokenizer.json")
    loaded = load_model(str(tmp_path / "merged"))
    assert loaded.config.fptquant == {"down_proj_hadamard_block": 16, "dynamic_scaling": True}
    assert loaded.dynamic_scaling and loaded.layers[0].mlp.down_input_transform is not None
    assert torch.equal(loaded(tokens), model(tokens))
    assert_same_logits(loaded(tokens), reference, tol=1e-4)


def test_unknown_transform_name_rejected():
    with pytest.raises(ValueError, match="unknown transforms"):
        Transforms(tiny_config(), enabled=["rotation", "nope"])


def test_transform_parameters_get_gradients(tokens):
    model = folded_model(CONFIGS["gqa"]).float()
    transforms = randomize(Transforms(model.config))
    weights = transforms.merged_weights(dict(model.named_parameters()))
    loss = sum(w.pow(4).mean() for w in weights.values())
    loss.backward()
    for name, param in transforms.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name


def test_deepcopy_keeps_parametrizations():
    transforms = Transforms(tiny_config())
    clone = copy.deepcopy(transforms)
    torch.testing.assert_close(clone.rotation.matrix, transforms.rotation.matrix)
