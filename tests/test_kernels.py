"""Tests for kernels.py: INT4 packing, exact integer matmul back ends, and IntLinear against the
fake-quantized linear."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import (  # noqa: E402
    FbgemmMatmul,
    IntLinear,
    IntMmMatmul,
    activation_code_range,
    int_mm_cuda_shapes,
    pack_int4,
    unpack_int4,
)

HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


def fake_quant_linear(x, w_int, s_w, s_x, z, act_bits, symmetric_act, bias=None):
    """Reference: the fake-quantized linear, written from the project's conventions."""
    low, high = activation_code_range(act_bits, symmetric_act)
    x_q = torch.clamp(torch.round(x / s_x) + z, low, high)
    x_hat = (x_q - z) * s_x
    y = x_hat @ (w_int.float() * s_w[:, None]).T
    return y if bias is None else y + bias


def random_weights(out_features, in_features, bits, generator):
    w_max = 2 ** (bits - 1)
    return torch.randint(-w_max, w_max, (out_features, in_features), dtype=torch.int8, generator=generator)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


# --- INT4 packing ---------------------------------------------------------------------------


def test_pack_int4_round_trip_all_values():
    w_int = torch.arange(-8, 8, dtype=torch.int8).reshape(2, 8)
    packed = pack_int4(w_int)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 4)
    assert torch.equal(unpack_int4(packed, 8), w_int)


def test_pack_int4_odd_columns_padded():
    generator = torch.Generator().manual_seed(1)
    w_int = torch.randint(-8, 8, (5, 7), dtype=torch.int8, generator=generator)
    packed = pack_int4(w_int)
    assert packed.shape == (5, 4)
    assert torch.equal(packed[:, -1] >> 4, torch.zeros(5, dtype=torch.uint8))  # zero pad column
    assert torch.equal(unpack_int4(packed, 7), w_int)


def test_pack_int4_nibble_layout():
    packed = pack_int4(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x78]]  # column 2j in the low nibble, two's complement


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))


# --- Integer matmul back ends: exact against an int64 reference ------------------------------


def int64_reference(centered, w_int):
    return centered.long() @ w_int.long().T


# (act_bits, weight_bits): W4A4, W4A8 and W8A7 fit fbgemm's int16 pairs, but W8A8 needs the code split.
BIT_WIDTHS = [(4, 4), (8, 4), (7, 8), (8, 8)]


def random_centered_codes(rows, in_features, act_bits, zero_point, generator):
    codes = torch.randint(0, 2**act_bits, (rows, in_features), generator=generator)
    return (codes - zero_point).float()


@pytest.mark.skipif(not HAS_FBGEMM, reason="torch built without fbgemm")
@pytest.mark.parametrize("act_bits,weight_bits", BIT_WIDTHS)
def test_fbgemm_matmul_exact_random(act_bits, weight_bits):
    generator = torch.Generator().manual_seed(act_bits * 10 + weight_bits)
    w_int = random_weights(24, 100, weight_bits, generator)
    zero_point = 2 ** (act_bits - 1) - 3
    centered = random_centered_codes(9, 100, act_bits, zero_point, generator)
    acc = FbgemmMatmul(w_int, act_bits, weight_bits)(centered, zero_point)
    assert torch.equal(acc.double(), int64_reference(centered, w_int).double())


@pytest.mark.skipif(not HAS_FBGEMM, reason="torch built without fbgemm")
@pytest.mark.parametrize("act_bits,weight_bits", BIT_WIDTHS)
def test_fbgemm_matmul_exact_extremes(act_bits, weight_bits):
    # Largest codes times the most negative weight: the case that saturates int16 pairs.
    w_int = torch.full((16, 64), -(2 ** (weight_bits - 1)), dtype=torch.int8)
    w_int[1] = 2 ** (weight_bits - 1) - 1
    codes = torch.full((3, 64), 2.0**act_bits - 1)
    codes[1] = 0
    acc = FbgemmMatmul(w_int, act_bits, weight_bits)(codes, 0)  # zero point 0: centered = unsigned
    assert torch.equal(acc.double(), int64_reference(codes, w_int).double())


@pytest.mark.skipif(not HAS_FBGEMM, reason="torch built without fbgemm")
def test_fbgemm_split_only_when_pairs_overflow():
    assert not FbgemmMatmul(torch.zeros(2, 8, dtype=torch.int8), 7, 8).split_codes
    assert FbgemmMatmul(torch.zeros(2, 8, dtype=torch.int8), 8, 8).split_codes
    assert kernels.fbgemm_products_fit_int16(8, 7)
    assert kernels.fbgemm_products_fit_int16(8, 4)
    assert not kernels.fbgemm_products_fit_int16(8, 8)


@pytest.mark.parametrize("rows,in_features,out_features", [(1, 37, 13), (5, 64, 24), (20, 9, 3)])
def test_int_mm_matmul_exact_cpu(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows)
    w_int = random_weights(out_features, in_features, 8, generator)
    centered = random_centered_codes(rows, in_features, 8, 77, generator)
    for pad_for_cuda in (False, True):
        acc = IntMmMatmul(w_int, pad_for_cuda)(centered, 77)
        assert acc.shape == (rows, out_features)
        assert torch.equal(acc.double(), int64_reference(centered, w_int).double())


@pytest.mark.parametrize("rows,in_features,out_features", [(1, 37, 13), (17, 64, 24), (100, 8, 9)])
def test_int_mm_cuda_shapes_meet_rules(rows, in_features, out_features):
    padded_rows, padded_in, padded_out = int_mm_cuda_shapes(rows, in_features, out_features)
    assert padded_rows > 16
    assert padded_rows >= rows
    assert padded_in % 8 == 0
    assert in_features <= padded_in < in_features + 8
    assert padded_out % 8 == 0
    assert out_features <= padded_out < out_features + 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int_mm_matmul_exact_cuda():
    generator = torch.Generator().manual_seed(0)
    w_int = random_weights(13, 37, 8, generator)
    centered = random_centered_codes(3, 37, 8, 100, generator)
    acc = IntMmMatmul(w_int.cuda(), pad_for_cuda=True)(centered.cuda(), 100)
    assert torch.equal(acc.cpu().double(), int64_reference(centered, w_int).double())


# --- IntLinear against the fake-quantized linear ----------------------------------------------


def build_case(act_bits, weight_bits, symmetric_act, in_features=37, out_features=19, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w_int = random_weights(out_features, in_features, weight_bits, generator)
    s_w = torch.rand(out_features, generator=generator) * 0.02 + 0.01
    bias = torch.randn(out_features, generator=generator)
    # Inputs with a nonzero mean, so that a dropped zero-point term shows, and two far outside the
    # static range, so that codes clamp at both ends.
    x = 1.5 * torch.randn(2, 3, in_features, generator=generator) + 1.5
    x[0, 0, :2] = torch.tensor([-100.0, 100.0])
    if symmetric_act:
        s_x, z = 5.0 / 2 ** (act_bits - 1), 0.0  # static range about [-5, 5]
    else:
        s_x = 6.0 / (2**act_bits - 1)  # static range about [-2.5, 3.5]
        z = float(round(2.5 / s_x))
    return x, w_int, s_w, s_x, z, bias


@pytest.mark.parametrize("in_features,out_features", [(37, 19), (64, 8), (5, 130)])
@pytest.mark.parametrize("symmetric_act", [False, True])
@pytest.mark.parametrize("act_bits,weight_bits", [(4, 4), (8, 4), (4, 8), (8, 8)])
def test_int_linear_matches_fake_quant(act_bits, weight_bits, symmetric_act, in_features, out_features):
    x, w_int, s_w, s_x, z, bias = build_case(act_bits, weight_bits, symmetric_act, in_features, out_features)
    module = IntLinear.from_quantized(w_int, s_w, s_x, z, act_bits, weight_bits, symmetric_act, bias)
    expected = fake_quant_linear(x, w_int, s_w, s_x, z, act_bits, symmetric_act, bias)
    actual = module(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("act_bits,weight_bits", [(4, 4), (8, 8)])
def test_tolerance_catches_missing_zero_point(act_bits, weight_bits):
    # The tolerance above must reject an output that omits the zero-point term z * rowsum(w).
    x, w_int, s_w, s_x, z, bias = build_case(act_bits, weight_bits, symmetric_act=False)
    assert z != 0
    expected = fake_quant_linear(x, w_int, s_w, s_x, z, act_bits, False, bias)
    without_zero_point = expected + z * s_x * (w_int.float().sum(dim=1) * s_w)
    assert relative_error(without_zero_point, expected) > 1e-2


@pytest.mark.parametrize("symmetric_act", [False, True])
def test_int_linear_codes_clamp(symmetric_act):
    x, w_int, s_w, s_x, z, bias = build_case(4, 4, symmetric_act)
    module = IntLinear.from_quantized(w_int, s_w, s_x, z, 4, 4, symmetric_act, bias)
    centered, zero_point = module.centered_codes(x)
    assert zero_point == (8 if symmetric_act else z)
    assert (centered + zero_point).min() == 0
    assert (centered + zero_point).max() == 15


@pytest.mark.parametrize("weight_bits,buffer,dtype,columns", [(4, "weight_packed", torch.uint8, 19),
                                                                (8, "weight_int", torch.int8, 37)])
def test_int_linear_weight_storage(weight_bits, buffer, dtype, columns):
    x, w_int, s_w, s_x, z, bias = build_case(8, weight_bits, symmetric_act=False)
    module = IntLinear.from_quantized(w_int, s_w, s_x, z, 8, weight_bits, False, bias)
    stored = getattr(module, buffer)
    assert stored.dtype == dtype
    assert stored.shape == (19, columns)
    assert torch.equal(module.weight_int8(), w_int)


def test_int_linear_state_dict_round_trip():
    x, w_int, s_w, s_x, z, bias = build_case(4, 4, symmetric_act=False)
    source = IntLinear.from_quantized(w_int, s_w, s_x, z, 4, 4, False, bias)
    target = IntLinear(37, 19, act_bits=4, weight_bits=4, symmetric_act=False, bias=True)
    target(x)  # builds the back end from the initial zero weights, which loading must replace
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), source(x))


def test_int_linear_drop_in_for_nn_linear():
    x, w_int, s_w, s_x, z, bias = build_case(8, 4, symmetric_act=True)
    model = nn.Sequential(nn.Linear(37, 19), nn.ReLU())
    model[0] = IntLinear.from_quantized(w_int, s_w, s_x, z, 8, 4, True, bias)
    expected = torch.relu(fake_quant_linear(x, w_int, s_w, s_x, z, 8, True, bias))
    assert relative_error(model(x), expected) < 1e-5


def test_int_linear_keeps_input_dtype():
    x, w_int, s_w, s_x, z, bias = build_case(8, 8, symmetric_act=False)
    module = IntLinear.from_quantized(w_int, s_w, s_x, z, 8, 8, False, bias)
    assert module(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_int_linear_rejects_weight_out_of_range():
    w_int = torch.full((2, 4), 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="w_int values"):
        IntLinear.from_quantized(w_int, torch.ones(2), 0.1, 0, 8, 4, False)


@pytest.mark.parametrize("z,symmetric_act", [(3.0, True), (2.5, False), (256.0, False), (-1.0, False)])
def test_int_linear_rejects_invalid_zero_point(z, symmetric_act):
    w_int = torch.zeros(2, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="zero point"):
        IntLinear.from_quantized(w_int, torch.ones(2), 0.1, z, 8, 4, symmetric_act)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("symmetric_act", [False, True])
def test_int_linear_matches_fake_quant_cuda(symmetric_act):
    x, w_int, s_w, s_x, z, bias = build_case(8, 4, symmetric_act)
    module = IntLinear.from_quantized(w_int, s_w, s_x, z, 8, 4, symmetric_act, bias).cuda()
    expected = fake_quant_linear(x, w_int, s_w, s_x, z, 8, symmetric_act, bias)
    assert relative_error(module(x.cuda()).cpu(), expected) < 1e-5


# --- Benchmark ---------------------------------------------------------------------------------


def test_benchmark_report_small_shape():
    report = kernels.run_benchmark([(64, 40)], token_counts=[1, 17], budget_s=0.01)
    assert json.loads(json.dumps(report)) == report
    rows = report["results"]
    assert [row["tokens"] for row in rows] == [1, 17]
    assert rows[0]["fp32_speedup"] == 1.0
    assert rows[0]["w4a4_gb_per_s"] > 0
    assert "w4a4_gb_per_s" not in rows[1]
    table = kernels.format_table(report)
    assert "INT4 values on INT8 units" in table
    assert "64 -> 40" in table


def test_whole_model_int_kernels_match_fake_quantization(tmp_path):
    """A merged W4A8KV8 model run on IntLinears gives the fake-quantized perplexity within 0.5%."""
    from safetensors.torch import save_file

    from conftest import random_model, tiny_config
    from eval import perplexity
    from fptquant import QUANTIZED_FILE, METHODS, QuantConfig, QuantizedModel, export_quantized, load_quantizers
    from model import load_model, save_checkpoint
    from test_model import write_tokenizer

    for config in ("W4A8KV8", "W4A4KV4"):
        student = QuantizedModel(random_model(tiny_config()), QuantConfig.from_name(config), METHODS["fptquant"])
        batches = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
        student.calibrate(batches)
        student.merge()
        folder = tmp_path / config
        write_tokenizer(tmp_path)
        save_checkpoint(student.model, folder, tmp_path / "tokenizer.json")
        save_file(export_quantized(student.model), str(folder / QUANTIZED_FILE))

        model = load_model(str(folder))
        load_quantizers(model, folder)
        ids = torch.randint(0, 97, (256,), generator=torch.Generator().manual_seed(1))
        fake = perplexity(model, ids, 32)["ppl"]
        assert kernels.replace_linears_with_int(model, load_file(str(folder / QUANTIZED_FILE))) == 14
        assert isinstance(model.layers[0].mlp.down_proj, kernels.IntLinear)
        assert model.layers[0].mlp.down_input_quantizer is None
        assert perplexity(model, ids, 32)["ppl"] == pytest.approx(fake, rel=5e-3)


def test_prefill_benchmark_on_tiny_merged_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from conftest import random_model, tiny_config
    from fptquant import QUANTIZED_FILE, METHODS, QuantConfig, QuantizedModel, export_quantized
    from model import save_checkpoint
    from test_model import write_tokenizer

    student = QuantizedModel(random_model(tiny_config()), QuantConfig.from_name("W4A4KV4"), METHODS["rotation"])
    student.calibrate(torch.randint(0, 97, (2, 16)))
    student.merge()
    write_tokenizer(tmp_path)
    save_checkpoint(student.model, tmp_path / "merged", tmp_path / "tokenizer.json")
    save_file(export_quantized(student.model), str(tmp_path / "merged" / QUANTIZED_FILE))

    report = kernels.prefill_benchmark(tmp_path / "merged", seqlen=32, repeats=1)
    assert report["config"] == "W4A4KV4"
    assert report["seqlen"] == 32
    assert report["float_tokens_per_s"] > 0
    assert report["integer_tokens_per_s"] > 0
    assert kernels.checkpoint_shapes(tiny_config()) == [(32, 32), (32, 16), (32, 48), (48, 32)]
