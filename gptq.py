"""GPTQ: weight quantization with second-order error feedback, run on a merged FPTQuant model.

GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, arXiv 2210.17323) quantizes a linear's weight W
(out, in) so that the layer output on N calibration inputs X (N, in) changes little: it minimises
||X W^T - X Q^T||^2 / N, whose Hessian with respect to each row of W is H = 2/N X^T X (in, in).
Columns are quantized one at a time, left to right. Let G be the inverse Hessian of the columns
not yet quantized (i and later). The rounding error of column i, divided by G_ii, is spread over
the later columns in proportion to row i of G, so that they compensate for it (the Optimal Brain
Surgeon update). Row i of the upper Cholesky factor U of H^-1 = U^T U equals row i of G divided
by sqrt(G_ii), so one factorisation serves every column and no inverse is updated. Columns are
processed in blocks: the error feedback is applied inside the block column by column, and to the
columns after the block in one matrix product ("lazy batch updates").

Here GPTQ runs after training and merging. It keeps each linear's calibrated weight quantizer
(its scale and grid) and only chooses which grid point each weight gets. Hessians come from the
inputs each linear receives in the quantized model, streamed one decoder layer at a time.
"""

import logging
import time

import torch

from fptquant import QuantizedModel, Quantizer, fake_quantize
from model import rope_cos_sin

log = logging.getLogger("fptquant")

# The linears of a decoder block in the order GPTQ quantizes them. The linears of one group read
# the same input, so they share one Hessian, and each group's Hessian is collected with the
# earlier groups already quantized, as with the --true-sequential option of the GPTQ authors'
# reference code (github.com/IST-DASLab/gptq, llama.py).
LINEAR_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"),
                 ("mlp.down_proj",))

# When the Cholesky factorisation fails, the dampening is multiplied by 10, up to this many times.
DAMP_RETRIES = 4


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, *, name: str = "weight") -> torch.Tensor:
    """Return the GPTQ-quantized, dequantized ``weight`` (out, in) on the grid of ``quantizer``.

    ``quantizer`` is a static weight quantizer whose scale is already set (for example by
    ``init_from_tensor``), and each column is rounded exactly as ``quantizer(weight)`` rounds it.
    ``hessian`` (in, in) is 2/N X^T X of the layer inputs. ``damp`` adds damp * mean(diag(H)) to
    the diagonal. Columns whose Hessian diagonal is 0 (inputs that are always 0) become 0. With
    ``act_order`` the columns are quantized in order of decreasing diag(H). The last block is
    shorter when ``block_size`` does not divide ``in``, which changes only the speed, not the result.
    The column loop runs in float32 (float64 for float64 weights) and the Cholesky factorisation
    in float64. ``name`` labels the log messages. Returns a tensor of the dtype of ``weight``.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match a weight of "
                         f"shape {tuple(weight.shape)}, expected ({in_features}, {in_features})")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name}: the Hessian contains NaN or inf. Check the calibration activations")
    if quantizer.dynamic or (quantizer.granularity == "channel" and quantizer.channel_dim not in (0, -2)):
        raise ValueError(f"{name}: GPTQ needs a static per-tensor or per-output-channel (channel_dim=0) "
                         f"weight quantizer, got one with {quantizer.extra_repr()}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"invalid block_size {block_size!r}: expected a positive number of columns, e.g. 128")
    if not damp > 0:
        raise ValueError(f"invalid damp {damp!r}: expected a positive fraction of the mean Hessian diagonal, "
                         "e.g. 0.01")

    compute_dtype = torch.promote_types(weight.dtype, torch.float32)   # as in Quantizer.forward
    W = weight.detach().to(compute_dtype).clone()
    H = hessian.detach().double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # One scale (and zero point) per row, shaped (out, 1), so that column j quantizes like W[:, j].
    scale, zero_point = quantizer.scale_and_zero_point(weight)
    scale = scale.expand(out_features, 1)
    zero_point = 0.0 if zero_point is None else zero_point.expand(out_features, 1)

    if act_order:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    U = inverse_hessian_factor(H, damp, name).to(compute_dtype)

    Q = torch.zeros_like(W)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = W[:, start:end].clone()                        # (out, B), updated in place
        errors = torch.zeros_like(block)                       # (out, B)
        U_block = U[start:end, start:end]                      # (B, B)
        for i in range(end - start):
            column = block[:, i:i + 1]                         # (out, 1)
            quantized = fake_quantize(column, scale, zero_point, quantizer.qmin, quantizer.qmax)
            Q[:, start + i:start + i + 1] = quantized
            error = (column - quantized) / U_block[i, i]       # (out, 1)
            block[:, i:] -= error @ U_block[i:i + 1, i:]       # feedback to the rest of the block
            errors[:, i:i + 1] = error
        W[:, end:] -= errors @ U[start:end, end:]              # lazy update of the later columns

    if act_order:
        Q = Q[:, torch.argsort(order)]
    assert torch.isfinite(Q).all(), f"{name}: GPTQ produced non-finite weights"
    return Q.to(weight.dtype)


def inverse_hessian_factor(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Return the upper Cholesky factor U of (H + lambda I)^-1 = U^T U, in float64.

    lambda = damp * mean(diag(H)). A failed factorisation (H singular or, from float32 rounding,
    slightly indefinite) is retried with damp multiplied by 10, at most DAMP_RETRIES times.
    """
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diagonal = H.diagonal().mean()
    for attempt in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(H + damp * mean_diagonal * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        if attempt < DAMP_RETRIES:
            log.warning("%s: Cholesky factorisation of the damped Hessian failed at damp %g, retrying with "
                        "damp %g", name, damp, damp * 10)
            damp *= 10
    raise RuntimeError(f"{name}: Cholesky factorisation of the Hessian failed even with damp {damp:g}, so the "
                       "calibration inputs of this layer are degenerate. Use more calibration windows")


@torch.no_grad()
def gptq_model(quantized, batches: torch.Tensor, block_size: int = 128, damp: float = 0.01,
               act_order: bool = False, progress: bool = True) -> dict:
    """Replace the weight of every block linear of a merged model by its GPTQ weight.

    ``quantized`` is a merged ``QuantizedModel``, or a Llama loaded from a merged checkpoint with
    its quantizers attached (``load_quantizers``).

    ``batches`` (N, T) are calibration token ids, run one window at a time. The Hessian of a
    linear comes from its inputs in the quantized model: after the online Hadamard, S_n scaling
    and activation quantizer, and through the earlier linears already GPTQ-quantized. The layers
    are streamed: only the hidden states (N, T, d) of the current layer input and one Hessian are
    kept. Each layer runs five times over the windows, once per linear group and once with all
    its weights quantized to produce the next layer's input. The weight quantizers keep their
    scales, and every new weight is a fixed point of its quantizer, so the fake-quantized forward
    and ``export_quantized`` both see it unchanged. Re-running ``init_weight_ranges`` or training
    the weight scales afterwards would move the grid and undo that. Returns the settings used.
    """
    if isinstance(quantized, QuantizedModel) and not quantized.merged:
        raise ValueError("GPTQ runs on a merged model: call QuantizedModel.merge() before gptq_model()")
    if batches.ndim != 2 or batches.dtype != torch.long:
        raise ValueError(f"batches must be token ids of shape (N, T) and dtype int64, got shape "
                         f"{tuple(batches.shape)} and dtype {batches.dtype}")
    model = quantized.model if isinstance(quantized, QuantizedModel) else quantized
    if any(model.layers[0].get_submodule(name).weight_quantizer is None for group in LINEAR_GROUPS for name in group):
        raise ValueError("GPTQ needs weight quantizers, but this model keeps its weights in floating point. "
                         "Use a configuration with 2..8 weight bits, e.g. W4A8KV8")
    settings = {"block_size": block_size, "damp": damp, "act_order": act_order,
                "windows": batches.shape[0], "seqlen": batches.shape[1]}
    log.info("GPTQ on %d layers: %s", len(model.layers), settings)

    device = model.embed_tokens.weight.device
    hidden = model.embed_tokens(batches.to(device))                   # (N, T, d)
    cos, sin = rope_cos_sin(model.config, batches.shape[1], device, hidden.dtype)
    scales = torch.ones_like(hidden[..., :1]) if model.dynamic_scaling else None  # (N, T, 1), S_n

    start = time.perf_counter()
    for index, layer in enumerate(model.layers):
        for group in LINEAR_GROUPS:
            linears = [layer.get_submodule(name) for name in group]
            hessian = collect_hessian(layer, linears[0], hidden, scales, cos, sin)
            for name, linear in zip(group, linears):
                quantize_linear(linear, hessian, block_size, damp, act_order, f"layers.{index}.{name}")
        hidden, scales = run_layer(layer, hidden, scales, cos, sin)

        if progress:
            elapsed = time.perf_counter() - start
            eta = elapsed / (index + 1) * (len(model.layers) - index - 1)
            log.info("GPTQ layer %d/%d done, %.1f s elapsed, ETA %.0f s", index + 1, len(model.layers), elapsed, eta)
    return settings


def run_layer(layer, hidden: torch.Tensor, scales: torch.Tensor | None, cos, sin):
    """Run a decoder block over every window of ``hidden`` (N, T, d) and return the outputs and S_n scales."""
    outputs, new_scales = torch.empty_like(hidden), None if scales is None else torch.empty_like(scales)
    for n in range(hidden.shape[0]):
        scale = None if scales is None else scales[n:n + 1]
        output, scale = layer(hidden[n:n + 1], cos, sin, scale)
        outputs[n:n + 1] = output
        if scales is not None:
            new_scales[n:n + 1] = scale
    return outputs, new_scales


def collect_hessian(layer, linear, hidden, scales, cos, sin) -> torch.Tensor:
    """Return H = 2/N sum x^T x (float32) over the N input rows that ``linear`` receives in ``layer``."""
    total = torch.zeros(linear.in_features, linear.in_features, device=hidden.device)
    count = 0

    def accumulate(module, args):
        nonlocal total, count
        x = args[0].reshape(-1, linear.in_features).float()    # (B * T, in)
        total += x.T @ x
        count += x.shape[0]

    handle = linear.register_forward_pre_hook(accumulate)
    try:
        run_layer(layer, hidden, scales, cos, sin)
    finally:
        handle.remove()
    return total * (2 / count)


def quantize_linear(linear, hessian, block_size, damp, act_order, name) -> None:
    """Write the GPTQ weight into ``linear`` and check that its weight quantizer leaves it unchanged."""
    quantizer = linear.weight_quantizer
    weight = gptq_quantize(linear.weight, hessian, quantizer, block_size, damp, act_order, name=name)
    linear.weight.copy_(weight)
    assert torch.equal(quantizer(linear.weight), linear.weight), f"{name}: GPTQ weight is off the quantizer's grid"
