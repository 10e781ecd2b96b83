"""GPTQ: the column loop against RTN, singular Hessians, and the layer-by-layer stream."""

import copy
import logging

import pytest
import torch

from conftest import random_model, tiny_config
from fptquant import METHODS, QuantConfig, QuantizedModel, Quantizer, export_quantized, weight_quantizer
from gptq import LINEAR_GROUPS, gptq_model, gptq_quantize
from test_transforms import randomize


def calibrated_weight_quantizer(weight: torch.Tensor, bits: int = 4):
    quantizer = weight_quantizer(bits, weight.shape[0])
    quantizer.init_from_tensor(weight)
    return quantizer


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def output_error(x, weight, quantized) -> float:
    return (x @ weight.T - x @ quantized.T).norm().item()


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs x = z A with a random mixing A, so that x^T x is far from diagonal."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, features, generator=generator)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    return z @ mixing


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [128, 7])
def test_identity_hessian_reproduces_rtn(act_order, block_size):
    torch.manual_seed(0)
    weight = torch.randn(16, 40)
    quantizer = calibrated_weight_quantizer(weight)
    result = gptq_quantize(weight, torch.eye(40), quantizer, block_size=block_size, act_order=act_order)
    assert torch.equal(result, quantizer(weight))


@pytest.mark.parametrize("act_order", [False, True])
def test_correlated_inputs_beat_rtn(act_order):
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    x = correlated_inputs(1024, 64)
    quantizer = calibrated_weight_quantizer(weight)

    result = gptq_quantize(weight, hessian_of(x), quantizer, act_order=act_order)
    rtn_error = output_error(x, weight, quantizer(weight))
    gptq_error = output_error(x, weight, result)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)
    assert torch.equal(quantizer(result), result)


def test_block_size_changes_only_rounding():
    torch.manual_seed(2)
    weight = torch.randn(24, 50)
    hessian = hessian_of(correlated_inputs(512, 50, seed=2)).double()
    quantizer = calibrated_weight_quantizer(weight.double())
    whole = gptq_quantize(weight.double(), hessian, quantizer, block_size=128)
    blocked = gptq_quantize(weight.double(), hessian, quantizer, block_size=8)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-9)


def test_singular_hessian_gives_finite_grid_weight():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(256, 8, generator=generator) @ torch.randn(8, 32, generator=generator)  # rank 8
    x[:, 5] = 0.0                                                                          # a dead input
    weight = torch.randn(16, 32, generator=generator)
    quantizer = calibrated_weight_quantizer(weight)

    for act_order in (False, True):
        result = gptq_quantize(weight, hessian_of(x), quantizer, act_order=act_order)
        assert torch.isfinite(result).all()
        assert torch.equal(result[:, 5], torch.zeros(16))
        assert torch.equal(quantizer(result), result)


def test_failed_cholesky_retries_with_more_dampening(caplog):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 4, generator=generator) @ torch.randn(4, 16, generator=generator)
    hessian = hessian_of(x)
    # Slightly indefinite, as float32 rounding can make a singular Hessian: damp 0.01 is too
    # little to make it positive definite, damp 0.1 is enough.
    hessian -= 0.05 * hessian.diagonal().mean() * torch.eye(16)
    weight = torch.randn(8, 16, generator=generator)
    quantizer = calibrated_weight_quantizer(weight)

    with caplog.at_level(logging.WARNING, logger="fptquant"):
        result = gptq_quantize(weight, hessian, quantizer, damp=0.01, name="probe")
    assert torch.isfinite(result).all()
    assert torch.equal(quantizer(result), result)
    assert "probe: Cholesky factorisation of the damped Hessian failed at damp 0.01" in caplog.text


def test_hopeless_hessian_raises_instead_of_nan():
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="Cholesky factorisation of the Hessian failed"):
        gptq_quantize(weight, -torch.eye(16), calibrated_weight_quantizer(weight))


def test_invalid_arguments_raise():
    weight = torch.randn(8, 16)
    quantizer = calibrated_weight_quantizer(weight)
    with pytest.raises(ValueError, match="does not match a weight"):
        gptq_quantize(weight, torch.eye(15), quantizer)
    with pytest.raises(ValueError, match="invalid damp"):
        gptq_quantize(weight, torch.eye(16), quantizer, damp=0.0)
    with pytest.raises(ValueError, match="invalid block_size"):
        gptq_quantize(weight, torch.eye(16), quantizer, block_size=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_quantize(weight, torch.full((16, 16), float("nan")), quantizer)
    per_input_channel = Quantizer(4, symmetric=True, granularity="channel", channel_dim=1, num_channels=16)
    with pytest.raises(ValueError, match="per-output-channel"):
        gptq_quantize(weight, torch.eye(16), per_input_channel)


# ----------------------------------------------------------------------------------------------
# The whole model


def merged_model(method: str, config_name: str = "W4A8KV8") -> QuantizedModel:
    teacher = random_model(tiny_config())
    student = QuantizedModel(teacher, QuantConfig.from_name(config_name), METHODS[method])
    randomize(student.transforms, seed=1)
    torch.manual_seed(0)
    student.calibrate(torch.randint(0, 97, (3, 16)))
    student.merge()
    return student


def calibration_batches() -> torch.Tensor:
    return torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def reference_gptq(qmodel, batches, block_size=128, damp=0.01, act_order=False) -> None:
    """Quantize group by group, each Hessian from forwards of the whole model over every window.

    Slow but direct: every linear of a group collects its own inputs, so the test also checks
    that the linears of a group share their input.
    """
    model = qmodel.model
    for layer in model.layers:
        for group in LINEAR_GROUPS:
            linears = [layer.get_submodule(name) for name in group]
            hessians = [torch.zeros(linear.in_features, linear.in_features) for linear in linears]
            counts = [0] * len(linears)

            def accumulate(module, args, index):
                x = args[0].reshape(-1, module.in_features).float()      # (T, in)
                hessians[index] += x.T @ x
                counts[index] += x.shape[0]

            handles = [linear.register_forward_pre_hook(lambda m, a, i=i: accumulate(m, a, i))
                       for i, linear in enumerate(linears)]
            for batch in batches:
                model(batch[None])
            for handle in handles:
                handle.remove()

            for linear, hessian, count in zip(linears, hessians, counts):
                new = gptq_quantize(linear.weight, hessian * (2 / count), linear.weight_quantizer,
                                    block_size, damp, act_order)
                linear.weight.copy_(new)


def block_linear_weights(qmodel) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in qmodel.model.named_parameters()
            if name.startswith("layers.") and name.endswith("proj.weight")}


@pytest.mark.parametrize("method", ["rtn", "fptquant"])
def test_stream_matches_whole_model_reference(method):
    streamed = merged_model(method)
    assert streamed.model.dynamic_scaling == (method == "fptquant")
    reference = copy.deepcopy(streamed)
    rtn = {name: streamed.model.get_submodule(name.removesuffix(".weight")).weight_quantizer(weight)
           for name, weight in block_linear_weights(streamed).items()}

    gptq_model(streamed, calibration_batches(), block_size=16, progress=False)
    reference_gptq(reference, calibration_batches(), block_size=16)

    expected = block_linear_weights(reference)
    for name, weight in block_linear_weights(streamed).items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
    changed = [name for name, weight in expected.items() if not torch.equal(weight, rtn[name])]
    assert len(changed) == len(expected), "GPTQ left some weights at their RTN values"


@pytest.mark.parametrize("method", ["rtn", "fptquant"])
def test_gptq_model_beats_rtn_on_calibration(method):
    teacher = random_model(tiny_config())
    qmodel = merged_model(method)
    batches = calibration_batches()
    with torch.no_grad():
        reference = teacher(batches)
        rtn_error = (qmodel(batches) - reference).pow(2).mean()
        gptq_model(qmodel, batches, progress=False)
        gptq_error = (qmodel(batches) - reference).pow(2).mean()
    assert gptq_error < rtn_error


def test_gptq_weights_are_quantizer_fixed_points():
    qmodel = merged_model("fptquant")
    settings = gptq_model(qmodel, calibration_batches(), act_order=True, progress=False)
    assert settings == {"block_size": 128, "damp": 0.01, "act_order": True, "windows": 4, "seqlen": 16}

    tensors = export_quantized(qmodel.model)
    for name, weight in block_linear_weights(qmodel).items():
        linear = qmodel.model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(linear.weight_quantizer(weight), weight), name
        prefix = name.removesuffix(".weight")
        dequantized = tensors[prefix + ".weight_int"].float() * tensors[prefix + ".weight_scale"]
        torch.testing.assert_close(dequantized, weight, rtol=0, atol=0, msg=name)


def test_gptq_model_logs_progress(caplog):
    qmodel = merged_model("rtn", "W4A16KV16")
    with caplog.at_level(logging.INFO, logger="fptquant"):
        gptq_model(qmodel, calibration_batches())
    assert "GPTQ layer 2/2 done" in caplog.text
    assert "'damp': 0.01" in caplog.text


def test_gptq_model_rejects_unusable_models():
    teacher = random_model(tiny_config())
    unmerged = QuantizedModel(teacher, QuantConfig.from_name("W4A8KV8"), METHODS["rtn"])
    with pytest.raises(ValueError, match="call QuantizedModel.merge"):
        gptq_model(unmerged, calibration_batches())

    float_weights = merged_model("rtn", "W16A8KV8")
    with pytest.raises(ValueError, match="keeps its weights in floating point"):
        gptq_model(float_weights, calibration_batches())

    with pytest.raises(ValueError, match="shape \\(N, T\\) and dtype int64"):
        gptq_model(merged_model("rtn"), calibration_batches().float())
