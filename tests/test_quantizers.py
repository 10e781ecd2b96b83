"""Fake quantization: integer grids, STE and LSQ gradients, range calibration and bit configs."""

import pytest
import torch

from fptquant import (QuantConfig, Quantizer, activation_quantizer, kv_quantizer, search_range,
                      weight_quantizer)


def student_t(n: int, seed: int) -> torch.Tensor:
    """Sample Student-t with 2 degrees of freedom: z / sqrt(chi2_2 / 2)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    chi2 = torch.randn(2, n, generator=generator, dtype=torch.float64).pow(2).sum(0)
    return (z / (chi2 / 2).sqrt()).float()


def static_quantizer(bits, symmetric, scale, zero_point=None):
    """A static per-tensor float64 quantizer with a hand-set scale and zero point."""
    quantizer = Quantizer(bits, symmetric, "tensor").double()
    quantizer.init_from_tensor(torch.tensor([-1.0, 1.0]), method="minmax")
    with torch.no_grad():
        quantizer.scale.fill_(scale)
        if zero_point is not None:
            quantizer.zero_point.fill_(zero_point)
    return quantizer


# -- hand-computed values ------------------------------------------------------------------------

def test_symmetric_int4_minmax_values():
    x = torch.tensor([-1.75, -0.6, 0.0, 0.3, 1.1, 1.75])
    quantizer = Quantizer(4, symmetric=True, granularity="tensor")
    quantizer.init_from_tensor(x, method="minmax")

    # absmax 1.75 maps to qmax 7: scale 0.25; x / s = [-7, -2.4, 0, 1.2, 4.4, 7].
    assert quantizer.scale.item() == 0.25
    assert torch.equal(quantizer(x), torch.tensor([-1.75, -0.5, 0.0, 0.25, 1.0, 1.75]))

    codes, scale, zero_point = quantizer.quantize_to_int(x)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [-7, -2, 0, 1, 4, 7]
    assert zero_point.item() == 0


def test_symmetric_int4_clips_to_minus8_and_7():
    x = torch.tensor([-1.75, -0.6, 0.0, 0.3, 1.1, 1.75])
    quantizer = Quantizer(4, symmetric=True, granularity="tensor")
    quantizer.init_from_tensor(x, method="minmax")
    with torch.no_grad():
        quantizer.scale.fill_(0.125)

    # x / s = [-14, -4.8, 0, 2.4, 8.8, 14] -> rounded [-14, -5, 0, 2, 9, 14] -> clamped to [-8, 7].
    assert torch.equal(quantizer(x), torch.tensor([-1.0, -0.625, 0.0, 0.25, 0.875, 0.875]))
    assert quantizer.quantize_to_int(x)[0].tolist() == [-8, -5, 0, 2, 7, 7]


def test_asymmetric_int4_minmax_values():
    x = torch.tensor([-1.0, -0.3, 0.0, 0.6, 2.75])
    quantizer = Quantizer(4, symmetric=False, granularity="tensor")
    quantizer.init_from_tensor(x, method="minmax")

    # Range [-1, 2.75] over 15 steps: scale 0.25, zero point round(1 / 0.25) = 4.
    assert quantizer.scale.item() == 0.25
    assert quantizer.zero_point.item() == 4
    assert torch.equal(quantizer(x), torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.75]))

    codes, scale, zero_point = quantizer.quantize_to_int(x)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [0, 3, 4, 6, 15]
    assert zero_point.item() == 4
    assert torch.equal(Quantizer.dequantize(codes, scale, zero_point), quantizer(x))


def test_asymmetric_range_includes_zero():
    x = torch.tensor([0.5, 1.0, 3.75])
    quantizer = Quantizer(4, symmetric=False, granularity="tensor")
    quantizer.init_from_tensor(x, method="minmax")

    # The range is [0, 3.75], not [0.5, 3.75], so 0 is on the grid: scale 0.25, zero point 0.
    assert quantizer.scale.item() == 0.25
    assert quantizer.zero_point.item() == 0
    assert torch.equal(quantizer(x), x)


def test_round_half_to_even():
    quantizer = static_quantizer(4, True, scale=1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5], dtype=torch.float64)
    assert quantizer(x).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0]


def test_quantize_to_int_roundtrip_matches_forward():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    quantizer = weight_quantizer(4, 6)
    quantizer.init_from_tensor(w)

    codes, scale, zero_point = quantizer.quantize_to_int(w)
    assert codes.dtype == torch.int8
    assert scale.shape == (6, 1)
    assert codes.min() >= -8
    assert codes.max() <= 7
    assert torch.equal(Quantizer.dequantize(codes, scale, zero_point), quantizer(w))


# -- gradients -------------------------------------------------------------------------------------

def test_ste_input_gradient_inside_and_clipped():
    quantizer = static_quantizer(4, True, scale=0.25)
    # x / s = [-12, -4.8, 1.2, 6.4, 7.6, 20]; 7.6 rounds to 8, above qmax 7, so it is clipped too.
    x = torch.tensor([-3.0, -1.2, 0.3, 1.6, 1.9, 5.0], dtype=torch.float64, requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("symmetric, zero_point", [(True, None), (False, 3.0)])
def test_scale_gradient_matches_lsq(symmetric, zero_point):
    scale = 0.3
    quantizer = static_quantizer(4, symmetric, scale, zero_point)
    qmin, qmax = quantizer.qmin, quantizer.qmax
    z = 0.0 if zero_point is None else zero_point

    generator = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(1000, generator=generator, dtype=torch.float64)
    upstream = torch.randn(1000, generator=generator, dtype=torch.float64)
    (quantizer(x) * upstream).sum().backward()

    # LSQ: d x_hat / d s = round(x/s) - x/s inside the grid, qmin - z below it, qmax - z above it.
    code = torch.round(x / scale) + z
    expected = torch.where(code < qmin, qmin - z,
                           torch.where(code > qmax, qmax - z, torch.round(x / scale) - x / scale))
    assert (code < qmin).any(), "the test needs values clipped below"
    assert (code > qmax).any(), "the test needs values clipped above"
    torch.testing.assert_close(quantizer.scale.grad, (upstream * expected).sum(), rtol=1e-12, atol=1e-12)


def test_zero_point_gradient_only_from_clipped_values():
    scale = 0.3
    # The zero point 3.3 is rounded to 3 in the forward pass, with a straight-through gradient.
    quantizer = static_quantizer(4, False, scale, zero_point=3.3)

    generator = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(1000, generator=generator, dtype=torch.float64)
    upstream = torch.randn(1000, generator=generator, dtype=torch.float64)
    (quantizer(x) * upstream).sum().backward()

    # x_hat = (clamp(round(x/s) + z) - z) * s: the z terms cancel inside the grid, and a clipped
    # value (qmin or qmax - z) * s has gradient -s.
    code = torch.round(x / scale) + 3
    clipped = (code < 0) | (code > 15)
    assert clipped.any()
    assert not clipped.all()
    torch.testing.assert_close(quantizer.zero_point.grad, -scale * upstream[clipped].sum(),
                               rtol=1e-12, atol=1e-12)


# -- granularity -----------------------------------------------------------------------------------

def test_per_channel_weight_scales():
    w = torch.tensor([[1.4, -0.66, 0.2], [-14.0, 2.6, 7.4], [0.875, 0.0, -0.3]])
    quantizer = weight_quantizer(4, out_features=3)
    quantizer.init_from_tensor(w, method="minmax")

    assert quantizer.scale.shape == (3,)
    # Each row's absmax maps to 7: scales 1.4 / 7, 14 / 7 and 0.875 / 7.
    torch.testing.assert_close(quantizer.scale, torch.tensor([0.2, 2.0, 0.125]))
    codes, scale, _ = quantizer.quantize_to_int(w)
    assert scale.shape == (3, 1)
    assert codes.tolist() == [[7, -3, 1], [-7, 1, 4], [7, 0, -2]]
    assert quantizer(w).shape == w.shape


def test_per_channel_on_middle_dimension():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7)
    quantizer = Quantizer(4, True, "channel", channel_dim=1, num_channels=5)
    quantizer.init_from_tensor(x, method="minmax")

    _, scale, _ = quantizer.quantize_to_int(x)
    assert scale.shape == (1, 5, 1)
    expected = x.abs().amax(dim=(0, 2)) / 7
    torch.testing.assert_close(scale.flatten(), expected)
    with pytest.raises(ValueError, match="expects 5 channels"):
        quantizer(torch.randn(2, 4, 7))


def test_dynamic_per_token_matches_manual():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16) * torch.tensor([0.1, 1.0, 10.0])[:, None]
    quantizer = Quantizer(4, symmetric=False, granularity="token", dynamic=True)

    low = x.amin(-1, keepdim=True).clamp(max=0)
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 15
    zero_point = torch.round(-low / scale)
    expected = (torch.clamp(torch.round(x / scale) + zero_point, 0, 15) - zero_point) * scale

    assert quantizer.scale is None
    assert quantizer.zero_point is None
    torch.testing.assert_close(quantizer(x), expected, rtol=0, atol=1e-6)
    _, scale_out, zero_point_out = quantizer.quantize_to_int(x)
    assert scale_out.shape == (2, 3, 1)
    assert zero_point_out.shape == (2, 3, 1)


def test_dynamic_per_tensor_symmetric():
    x = torch.tensor([[-3.5, 0.4], [1.0, 0.26]])
    quantizer = Quantizer(4, symmetric=True, granularity="tensor", dynamic=True)
    # absmax 3.5 / 7 = 0.5 per step.
    assert torch.equal(quantizer(x), torch.tensor([[-3.5, 0.5], [1.0, 0.5]]))


def test_bfloat16_input_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    quantizer = activation_quantizer(4)
    quantizer.init_from_tensor(x)

    out = quantizer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), quantizer(x.bfloat16().float()).bfloat16().float())


# -- range initialisation --------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric, max_ratio", [(True, 0.7), (False, 0.8)])
def test_range_search_beats_minmax_on_heavy_tails(symmetric, max_ratio):
    # With seed 0 the sample's largest |value| is 66, far beyond the bulk, so min-max wastes most
    # of the 16 levels on the tail. The search minimises the L2.4 error and is judged in L2.
    x = student_t(10_000, seed=0)
    errors = {}
    for method in ("minmax", "search"):
        quantizer = Quantizer(4, symmetric, "tensor")
        quantizer.observe(x)
        quantizer.init_range(method)
        errors[method] = (quantizer(x) - x).pow(2).mean().item()
    assert errors["search"] < max_ratio * errors["minmax"], errors


def test_weight_search_never_worse_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 1, 16)[:, None]
    w[3, 5] = 40.0  # one outlier row
    errors = {}
    for method in ("minmax", "search"):
        quantizer = weight_quantizer(4, 16)
        quantizer.init_from_tensor(w, method)
        errors[method] = (quantizer(w) - w).abs().pow(2.4).mean(dim=1)
    # Ratio 1 is on the search grid, so every row's L2.4 error is at most min-max's.
    assert torch.all(errors["search"] <= errors["minmax"] * (1 + 1e-6))
    assert (errors["search"] < errors["minmax"]).sum() >= 12
    # The outlier row keeps its full range: clipping 40 would cost more than finer steps save.
    assert errors["search"][3] == errors["minmax"][3]


def test_search_range_rejects_unknown_method():
    with pytest.raises(ValueError, match="'percentile'"):
        search_range(torch.randn(1, 10), 4, True, method="percentile")


def test_reservoir_is_bounded_and_uniform():
    quantizer = Quantizer(8, False, "tensor", sample_size=1000)
    stream = torch.arange(20_000, dtype=torch.float32)
    for chunk in stream.split(800):
        quantizer.observe(chunk.reshape(8, 100))

    assert quantizer.samples.shape == (1, 1000)
    assert quantizer.num_observed == 20_000
    assert quantizer.observed_min.item() == 0.0
    assert quantizer.observed_max.item() == 19_999.0
    assert quantizer.samples.unique().numel() == 1000, "a reservoir holds distinct stream positions"
    # A uniform sample of 1000 from 0..19999 has mean 9999.5 with standard deviation about 180.
    assert abs(quantizer.samples.mean().item() - 9999.5) < 800
    assert (quantizer.samples > 15_000).sum() > 150, "late values must enter the reservoir"


def test_reservoir_is_reproducible_and_per_channel():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, 50, generator=generator) for _ in range(3)]
    quantizers = [Quantizer(4, True, "channel", channel_dim=1, num_channels=4, sample_size=400)
                  for _ in range(2)]
    for quantizer in quantizers:
        for batch in batches:
            quantizer.observe(batch)

    assert quantizers[0].samples.shape == (4, 100)
    assert torch.equal(quantizers[0].samples, quantizers[1].samples)
    torch.testing.assert_close(quantizers[0].observed_max,
                               torch.stack(batches).amax(dim=(0, 1, 3)))


def test_init_range_counts_exact_extremes():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    x[1234] = 70.0  # almost surely left out of a 100-value sample
    quantizer = Quantizer(4, True, "tensor", sample_size=100)
    quantizer.observe(x)
    assert 70.0 not in quantizer.samples
    quantizer.init_range("minmax")
    assert quantizer.scale.item() == pytest.approx(10.0)
    assert quantizer.samples is None, "init_range drops the observations"


def test_observing_mode_records_and_passes_through():
    quantizer = activation_quantizer(4)
    quantizer.observing = True
    x = torch.tensor([-1.0, 0.123, 2.75])
    assert quantizer(x) is x
    assert quantizer.num_observed == 3

    quantizer.observing = False
    quantizer.init_range("minmax")
    assert quantizer.scale.item() == 0.25


def test_uninitialised_static_quantizer_raises():
    quantizer = activation_quantizer(4)
    with pytest.raises(RuntimeError, match="calibrate it first"):
        quantizer(torch.randn(3))
    with pytest.raises(RuntimeError, match="observed no data"):
        quantizer.init_range()
    with pytest.raises(RuntimeError, match="nothing to observe"):
        Quantizer(4, True, "token", dynamic=True).observe(torch.randn(3))


def test_initialized_flag_survives_state_dict():
    calibrated = activation_quantizer(4)
    calibrated.init_from_tensor(torch.tensor([-1.0, 2.75]), method="minmax")
    fresh = activation_quantizer(4)
    fresh.load_state_dict(calibrated.state_dict())
    x = torch.tensor([0.3, -0.6])
    assert torch.equal(fresh(x), calibrated(x))


def test_disabled_quantizer_is_identity():
    quantizer = activation_quantizer(4)
    quantizer.enabled = False
    x = torch.randn(5)
    assert torch.equal(quantizer(x), x)
    assert "enabled=False" in repr(quantizer)


def test_extra_repr():
    text = repr(weight_quantizer(4, 8))
    assert "bits=4, symmetric=True, granularity=channel, channel_dim=0, static=True" in text
    assert "static=False" in repr(Quantizer(8, False, "token", dynamic=True))


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1, symmetric=True, granularity="tensor"), "invalid bit width 1"),
    (dict(bits=16, symmetric=True, granularity="tensor"), "invalid bit width 16"),
    (dict(bits=4, symmetric=True, granularity="group"), "invalid granularity 'group'"),
    (dict(bits=4, symmetric=True, granularity="token"), "must be dynamic"),
    (dict(bits=4, symmetric=True, granularity="channel"), "needs channel_dim"),
    (dict(bits=4, symmetric=True, granularity="channel", channel_dim=0), "needs num_channels"),
    (dict(bits=4, symmetric=True, granularity="tensor", channel_dim=0), "only to per-channel"),
])
def test_quantizer_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantizer(**kwargs)


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, bits", [
    ("W4A4KV4", (4, 4, 4)),
    ("W4A8KV8", (4, 8, 8)),
    ("W4A16KV16", (4, 16, 16)),
    ("W8A8KV8", (8, 8, 8)),
    ("w3a6kv2", (3, 6, 2)),
])
def test_quant_config_parses_names(name, bits):
    config = QuantConfig.from_name(name)
    assert (config.weight_bits, config.act_bits, config.kv_bits) == bits
    assert config.name == name.upper()


@pytest.mark.parametrize("name", ["W4A4", "int4", "W4A4KV4x", "W1A4KV4", "W4A9KV4", "W4A4KV32", ""])
def test_quant_config_rejects_bad_names(name):
    with pytest.raises(ValueError) as error:
        QuantConfig.from_name(name)
    assert repr(name) in str(error.value)
    assert "W4A4KV4, W4A8KV8, W4A16KV16 or W8A8KV8" in str(error.value)


def test_quant_config_overrides():
    config = QuantConfig.from_name("W4A4KV4")
    assert config.with_overrides(abits=8, kvbits=16) == QuantConfig(4, 8, 16)
    assert config.with_overrides() == config
    with pytest.raises(ValueError, match="invalid kv_bits 9"):
        config.with_overrides(kvbits=9)


def test_factories():
    assert weight_quantizer(16, 10) is None
    assert activation_quantizer(16) is None
    assert kv_quantizer(16) is None

    weight = weight_quantizer(4, 10)
    assert (weight.symmetric, weight.granularity, weight.channel_dim, weight.dynamic) == (True, "channel", 0, False)
    for quantizer in (activation_quantizer(8), kv_quantizer(4)):
        assert (quantizer.symmetric, quantizer.granularity, quantizer.dynamic) == (False, "tensor", False)
    assert activation_quantizer(8).bits == 8
