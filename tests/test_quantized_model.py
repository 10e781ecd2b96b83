"""The quantized model: quantizers in every slot, calibration, merge and export round trip."""

import torch
from safetensors.torch import save_file

from conftest import random_model, tiny_config
from fptquant import (QUANTIZED_FILE, METHODS, QuantConfig, QuantizedModel, export_quantized,
                      load_quantizers, named_quantizers)
from model import load_model, save_checkpoint
from test_model import write_tokenizer
from test_transforms import randomize


def calibrated(config_name="W4A4KV4", method="fptquant", seed=0):
    teacher = random_model(tiny_config())
    student = QuantizedModel(teacher, QuantConfig.from_name(config_name), METHODS[method])
    randomize(student.transforms, seed=seed + 1)
    torch.manual_seed(seed)
    student.calibrate(torch.randint(0, 97, (3, 16)))
    return teacher, student


def test_every_slot_has_a_quantizer():
    _, student = calibrated()
    layers = student.model.config.num_hidden_layers
    assert len(named_quantizers(student.model, weights=True)) == 7 * layers
    assert len(named_quantizers(student.model, weights=False)) == 6 * layers
    names = list(named_quantizers(student.model, weights=True)) + list(named_quantizers(student.model, weights=False))
    assert not [name for name in names if "lm_head" in name or "embed" in name]


def test_sixteen_bits_means_no_quantizer():
    teacher = random_model(tiny_config())
    student = QuantizedModel(teacher, QuantConfig.from_name("W4A16KV16"), METHODS["rtn"])
    assert len(named_quantizers(student.model, weights=False)) == 0
    assert len(named_quantizers(student.model, weights=True)) == 7 * 2


def test_quantization_changes_logits_but_little_at_8_bits(tokens):
    teacher, student4 = calibrated("W4A4KV4")
    _, student8 = calibrated("W8A8KV8")
    with torch.no_grad():
        reference = teacher(tokens)
        error4 = (student4(tokens) - reference).abs().mean()
        error8 = (student8(tokens) - reference).abs().mean()
    assert error8 > 0
    assert error8 < 0.2 * error4


def test_merged_equals_unmerged_quantized(tokens):
    _, student = calibrated()
    with torch.no_grad():
        before = student(tokens)
        student.merge()
        after = student(tokens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_exported_folder_reproduces_quantized_model(tmp_path, tokens):
    _, student = calibrated()
    student.merge()
    write_tokenizer(tmp_path)
    save_checkpoint(student.model, tmp_path / "merged", tmp_path / "tokenizer.json")
    save_file(export_quantized(student.model), str(tmp_path / "merged" / QUANTIZED_FILE))

    from safetensors import safe_open
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as weights:
        assert not [name for name in weights.keys() if "quantizer" in name]

    loaded = load_model(str(tmp_path / "merged"))
    assert load_quantizers(loaded, tmp_path / "merged").name == "W4A4KV4"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), student(tokens), rtol=1e-5, atol=1e-5)


def test_export_weights_are_on_the_int4_grid():
    _, student = calibrated()
    student.merge()
    tensors = export_quantized(student.model)
    codes = tensors["layers.0.mlp.down_proj.weight_int"]
    assert codes.dtype == torch.int8
    assert codes.min() >= -8
    assert codes.max() <= 7
    scale = tensors["layers.0.mlp.down_proj.weight_scale"]
    dequantized = codes.float() * scale
    weight = student.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(dequantized, student.model.layers[0].mlp.down_proj.weight_quantizer(weight))
