"""Quantized linears on real integer matmuls, and their speed against floating point.

Fake quantization shows what static INT4/INT8 quantization does to accuracy. This file runs the same
quantized linear with integer matrix multiplies, so that its speed can be measured.

Conventions, shared with the rest of the project:

- Weights: symmetric, per output channel. Integer values w_int in [-2^(b-1), 2^(b-1) - 1] and a float
  scale s_w[o]. The dequantized weight is w_int * s_w[:, None].
- Activations: static, per tensor, with scale s_x and zero point z (a float holding an integer).
  Asymmetric: x_q = clamp(round(x / s_x) + z, 0, 2^b - 1). Symmetric: z = 0 and the clamp range is
  [-2^(b-1), 2^(b-1) - 1]. torch.round rounds half to even. The fake-quantized activation is
  x_hat = (x_q - z) * s_x.
- The fake-quantized linear returns x_hat @ (w_int * s_w[:, None]).T + bias.

IntLinear returns the same values, up to float rounding, as s_x * s_w[o] * acc[o] + bias[o] with
acc[o] = sum_i (x_q_i - z) w_oi summed exactly in integers. The back ends receive the centered codes
x_q - z and the zero point u of their unsigned form q = x_q - z + u in [0, 2^b - 1], where u = z for
asymmetric activations and u = 2^(b-1) for symmetric ones:

- CUDA: torch._int_mm (int8 x int8 -> int32). The unsigned codes are shifted by 128 into int8, and
  the zero point is folded in with precomputed weight row sums:
      sum_i (q_i - u) w_oi = sum_i (q_i - 128) w_oi - (u - 128) * rowsum_o(w).
- CPU (x86): the fbgemm quantized linear (uint8 codes x int8 per-channel weights, int32 accumulation,
  fp32 output), which folds the zero point the same way inside the kernel.
- Weights of 4 bits or fewer are stored packed, two values per byte. torch has no matmul for INT4
  weights with integer activations, so they are unpacked to int8 once and run on the INT8 units.

`python kernels.py --bench` times IntLinear against nn.Linear on SmolLM2-135M and Llama-2-7B shapes.
`python kernels.py --candidates` times the CPU ops that the CPU back end was chosen from.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Linear shapes (in_features, out_features): q/k/v/o, gate/up and down projections.
SMOLLM2_135M_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BENCH_TOKEN_COUNTS = (1, 16, 128, 2048)

# torch 2.13 `_int_mm_out_cuda` requires self [M, K] with M > 16 and K a positive multiple of 8,
# and mat2 [K, N] with N a positive multiple of 8.
INT_MM_CUDA_MIN_ROWS = 17
INT_MM_CUDA_MULTIPLE = 8


# ---------------------------------------------------------------------------------------------
# INT4 storage


def pack_int4(w_int: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values [out, in] two per byte into uint8 [out, ceil(in / 2)].

    Column 2j goes into the low nibble and column 2j + 1 into the high nibble, each in 4-bit two's
    complement. An odd number of columns is padded with a zero column.
    """
    if w_int.numel() and (w_int.min() < -8 or w_int.max() > 7):
        raise ValueError(
            f"pack_int4: values must be in [-8, 7], got [{w_int.min().item()}, {w_int.max().item()}]"
        )
    if w_int.shape[1] % 2:
        w_int = F.pad(w_int, (0, 1))
    nibbles = (w_int.to(torch.int8) & 0xF).to(torch.uint8)  # [out, in_even], values 0..15
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Unpack uint8 [out, ceil(in / 2)] from pack_int4 into int8 [out, in_features]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    nibbles = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)  # [out, 2 * packed_cols]
    signed = nibbles - 16 * (nibbles >= 8).to(torch.int8)
    return signed[:, :in_features].contiguous()


# ---------------------------------------------------------------------------------------------
# Activation codes


def activation_code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Return the clamp range (min, max) of static activation codes x_q."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# ---------------------------------------------------------------------------------------------
# Integer matmul back ends. Each one is built once from int8 weights w [N, K]. It is called with
# centered codes c (float32 [M, K], integer values) and the zero point u of their unsigned form
# q = c + u in [0, 255], and returns acc = sum_i c_i w_oi as float32 [M, N], exact while |acc| < 2^24.


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def int_mm_cuda_shapes(rows: int, in_features: int, out_features: int) -> tuple[int, int, int]:
    """Return (M, K, N) padded to the shapes that CUDA torch._int_mm accepts."""
    return (
        max(rows, INT_MM_CUDA_MIN_ROWS),
        round_up(in_features, INT_MM_CUDA_MULTIPLE),
        round_up(out_features, INT_MM_CUDA_MULTIPLE),
    )


def pad_to_shape(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom and right to [rows, cols]."""
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


class IntMmMatmul:
    """Integer matmul with torch._int_mm: int8 x int8 -> int32 (CUDA, and the CPU fallback).

    With pad_for_cuda, the operands are zero-padded to the shapes CUDA _int_mm requires. Zero
    rows and columns add nothing to the product, and the result is sliced back to [M, N].
    """

    name = "torch._int_mm"

    def __init__(self, w_int: torch.Tensor, pad_for_cuda: bool):
        self.out_features, self.in_features = w_int.shape
        self.pad_for_cuda = pad_for_cuda
        if pad_for_cuda:
            _, padded_in, padded_out = int_mm_cuda_shapes(1, self.in_features, self.out_features)
            w_int = pad_to_shape(w_int, padded_out, padded_in)
        w_int = w_int.contiguous()

        # mat2 is the [K, N] transpose view of a row-major [N, K] weight, i.e. column-major: the
        # "TN" operand layout that cuBLASLt int8 kernels take. CPU _int_mm is also several times
        # faster with it than with a row-major mat2 (measured at 16 x 4096 x 4096).
        self.weight_t = w_int.t()
        self.row_sum = w_int.sum(dim=1, dtype=torch.int32)  # [N]
        self.weight_bytes = w_int.numel()

    def __call__(self, centered: torch.Tensor, zero_point: int) -> torch.Tensor:
        rows = centered.shape[0]
        shifted = (centered + (zero_point - 128)).to(torch.int8)  # [M, K], unsigned codes minus 128
        if self.pad_for_cuda:
            # NOTE: this CUDA path has not yet run on a GPU. Its padded call has only run through
            # CPU _int_mm.
            padded_rows, padded_in, _ = int_mm_cuda_shapes(rows, self.in_features, self.out_features)
            shifted = pad_to_shape(shifted, padded_rows, padded_in)

        acc = torch._int_mm(shifted, self.weight_t)  # [M_pad, N_pad] int32
        acc = acc[:rows, : self.out_features] - (zero_point - 128) * self.row_sum[: self.out_features]
        return acc.float()


def fbgemm_products_fit_int16(act_bits: int, weight_bits: int) -> bool:
    """Return whether fbgemm's uint8 x int8 kernels are exact without VNNI for these bit widths.

    Without VNNI, fbgemm multiplies with vpmaddubsw, which adds two adjacent uint8 x int8 products
    into a saturating int16. That is exact only while 2 * max(q) * max|w| <= 32767: W4A8 and W8A7
    are exact, W8A8 is not (measured on AVX2: 64 columns of q = 255 times w = -128 gave -1048576,
    that is 32 pairs saturated at -32768, in place of -2088960).
    """
    return 2 * (2**act_bits - 1) * 2 ** (weight_bits - 1) <= 32767


class FbgemmMatmul:
    """Integer matmul with the fbgemm quantized linear: uint8 codes x int8 weights, fp32 output.

    The op quantizes its float input as round(X / X_scale) + X_zero_point into uint8, multiplies by
    the prepacked per-channel int8 weights with int32 accumulation, subtracts X_zero_point times the
    weight row sums, and returns X_scale * w_scale[o] * acc as fp32. With unit scales, X = c and
    X_zero_point = u it returns acc itself.

    When the products could saturate int16 (see fbgemm_products_fit_int16), each code is split as
    q = 16 * high + low with high and low in [0, 15]. Both halves run as one GEMM with 2M rows, so
    the weights are still read once, and the zero point is folded in afterwards with the row sums.
    The result is then exact while |sum_i q_i w_oi| < 2^24.
    """

    name = "fbgemm"

    def __init__(self, w_int: torch.Tensor, act_bits: int, weight_bits: int):
        self.split_codes = not fbgemm_products_fit_int16(act_bits, weight_bits)
        self.row_sum = w_int.sum(dim=1, dtype=torch.int32).float()  # [N]
        self.packed = prepack_fbgemm_weight(w_int)
        self.weight_bytes = w_int.numel()

    def __call__(self, centered: torch.Tensor, zero_point: int) -> torch.Tensor:
        if not self.split_codes:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                centered, 1.0, zero_point, self.packed
            )

        rows = centered.shape[0]
        codes = centered + zero_point  # [M, K], unsigned codes q
        halves = torch.cat([torch.floor(codes / 16), codes % 16])  # [2M, K]: high rows, then low rows
        acc = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(halves, 1.0, 0, self.packed)
        return 16 * acc[:rows] + acc[rows:] - zero_point * self.row_sum


def prepack_fbgemm_weight(w_int: torch.Tensor):
    """Prepack int8 weights [N, K] for fbgemm as per-channel qint8 with unit scales."""
    rows = w_int.shape[0]
    with warnings.catch_warnings():
        # NOTE: torch 2.13 deprecates the quantized tensor types that fbgemm's prepack takes. The
        # plain-tensor oneDNN op (torch.ops.onednn.qlinear_pointwise) is the likely replacement. It
        # computes the same product, slower here up to M = 128 (see select_backend).
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch._make_per_channel_quantized_tensor(
            w_int, torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.int64), 0
        )

    # Prepack with the fbgemm engine whatever the current one is: weights packed by the onednn engine
    # raise "not implemented for this packed parameter type" in the fp32-output op.
    previous_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(qweight, None)
    finally:
        torch.backends.quantized.engine = previous_engine


def select_backend(device: torch.device) -> str:
    """Return the integer matmul back end for a device: "int_mm_cuda", "fbgemm" or "int_mm_cpu".

    CPU choice, measured with `python kernels.py --candidates` (AMD EPYC Zen 3 under KVM, AVX2
    without VNNI, 2 cores, torch 2.13.0; 4096 -> 4096 with 4-bit values; median ms):
                                              M=1     M=16    M=128   M=2048
        fp32 F.linear (MKL)                  3.08     11.5     32.8      445
        torch._int_mm                        5.98     98.5      991        -
        fbgemm quantized linear, fp32 out    0.54     1.78     18.2      306
        oneDNN qlinear_pointwise, fp32 out   2.35     5.22     21.4      240
    fbgemm is the fastest up to M = 128, which covers decoding and short prompts. oneDNN is 1.3x
    faster at M = 2048 but 1.2x to 4x slower below, and it saturates int16 pairs on W8A8 just like
    fbgemm (measured). torch._int_mm on CPU is 30x slower than fp32 at M = 128, so it only serves
    CPUs without fbgemm. The weight-only _weight_int8pack_mm and _weight_int4pack_mm_for_cpu
    multiply in bf16, so they are no integer path.
    """
    if device.type == "cuda":
        return "int_mm_cuda"
    if device.type != "cpu":
        raise ValueError(f"IntLinear has no integer matmul for device {device}; use cpu or cuda")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        return "fbgemm"
    return "int_mm_cpu"


def build_int_matmul(w_int: torch.Tensor, act_bits: int, weight_bits: int):
    """Build the integer matmul back end for the device of the int8 weights w_int [N, K]."""
    backend = select_backend(w_int.device)
    if backend == "fbgemm":
        return FbgemmMatmul(w_int, act_bits, weight_bits)
    return IntMmMatmul(w_int, pad_for_cuda=backend == "int_mm_cuda")


# ---------------------------------------------------------------------------------------------
# The module


class IntLinear(nn.Module):
    """Drop-in for nn.Linear with per-channel integer weights and static per-tensor activations.

    forward quantizes x with the static range, runs the integer matmul of its device's back end and
    rescales: y = s_x * s_w[o] * sum_i (x_q_i - z) w_oi + bias[o]. Quantization runs in float32,
    and the output has the dtype of x. Weights of 4 bits or fewer are stored packed two per byte in
    the `weight_packed` buffer, wider ones as int8 in `weight_int`.
    """

    def __init__(self, in_features: int, out_features: int, act_bits: int, weight_bits: int,
                 symmetric_act: bool, bias: bool = False):
        super().__init__()
        if not 2 <= act_bits <= 8 or not 2 <= weight_bits <= 8:
            raise ValueError(
                f"IntLinear supports 2 to 8 bits, got act_bits={act_bits}, weight_bits={weight_bits}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.weight_bits = weight_bits
        self.symmetric_act = symmetric_act

        if weight_bits <= 4:
            self.register_buffer(
                "weight_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
            )
        else:
            self.register_buffer("weight_int", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0.0))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

        # Back end built on first use, per device; see _int_matmul.
        self._matmul_cache = None

    @classmethod
    def from_quantized(cls, w_int, s_w, s_x, z, act_bits: int, weight_bits: int,
                       symmetric_act: bool, bias=None) -> "IntLinear":
        """Build from integer weights w_int [out, in], weight scales s_w [out] and the static
        activation scale s_x and zero point z."""
        out_features, in_features = w_int.shape
        module = cls(in_features, out_features, act_bits, weight_bits, symmetric_act, bias is not None)

        w_min, w_max = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
        if w_int.numel() and (w_int.min() < w_min or w_int.max() > w_max):
            raise ValueError(
                f"w_int values must be in [{w_min}, {w_max}] for {weight_bits}-bit weights, got "
                f"[{w_int.min().item()}, {w_int.max().item()}]"
            )
        z = float(z)
        code_min, code_max = activation_code_range(act_bits, symmetric_act)
        if z != round(z) or not code_min <= z <= code_max or (symmetric_act and z != 0):
            raise ValueError(
                f"zero point z={z} is invalid: it must be an integer in [{code_min}, {code_max}], "
                "and 0 for symmetric activations"
            )

        device = w_int.device
        w_int = w_int.to(torch.int8)
        if weight_bits <= 4:
            module.weight_packed = pack_int4(w_int)
        else:
            module.weight_int = w_int
        module.weight_scale = torch.as_tensor(s_w, dtype=torch.float32, device=device).reshape(out_features)
        module.input_scale = torch.as_tensor(float(s_x), dtype=torch.float32, device=device)
        module.input_zero_point = torch.tensor(z, dtype=torch.float32, device=device)
        if bias is not None:
            module.bias = torch.as_tensor(bias, dtype=torch.float32, device=device).reshape(out_features)
        return module

    def weight_int8(self) -> torch.Tensor:
        """Return the integer weights as int8 [out, in], unpacking 4-bit storage."""
        if self.weight_bits <= 4:
            return unpack_int4(self.weight_packed, self.in_features)
        return self.weight_int

    def centered_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Quantize x into centered codes x_q - z and return them with the zero point u of their
        unsigned form x_q - z + u in [0, 2^b - 1]."""
        z = self.input_zero_point.item()
        low, high = activation_code_range(self.act_bits, self.symmetric_act)

        # clamp(round(x / s_x) + z, low, high) - z, with z moved into the clamp bounds.
        centered = torch.clamp(torch.round(x.float() / self.input_scale), low - z, high - z)
        offset = 2 ** (self.act_bits - 1) if self.symmetric_act else 0
        return centered, int(z) + offset

    def _int_matmul(self, device: torch.device):
        if self._matmul_cache is None or self._matmul_cache[0] != device:
            matmul = build_int_matmul(self.weight_int8().to(device), self.act_bits, self.weight_bits)
            self._matmul_cache = (device, matmul)
        return self._matmul_cache[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self._matmul_cache = None  # the prepacked weights are stale once the buffers change
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered, zero_point = self.centered_codes(x)
        centered = centered.reshape(-1, self.in_features)  # [M, in], M = all leading dims

        acc = self._int_matmul(x.device)(centered, zero_point)  # [M, out]
        y = acc * (self.input_scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"W{self.weight_bits}A{self.act_bits}, symmetric_act={self.symmetric_act}, "
            f"bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------------------------
# Whole model

# Each group of block linears and the activation quantizer slot that feeds it.
QUANTIZED_INPUTS = (("self_attn", "input_quantizer", ("q_proj", "k_proj", "v_proj")),
                    ("self_attn", "o_input_quantizer", ("o_proj",)),
                    ("mlp", "input_quantizer", ("gate_proj", "up_proj")),
                    ("mlp", "down_input_quantizer", ("down_proj",)))


def replace_linears_with_int(model, tensors: dict[str, torch.Tensor]) -> int:
    """Swap every block linear of a merged model for an IntLinear built from the quantized export.

    ``model`` has its fake quantizers attached (``fptquant.load_quantizers``); ``tensors`` is the
    export (``quantized.safetensors``). Each IntLinear quantizes its own input with the static range
    of the activation quantizer it replaces, so those slots are emptied. The online Hadamard, S_n
    and the KV-cache quantizers stay as they are. Returns the number of linears replaced.
    """
    replaced = 0
    for i, layer in enumerate(model.layers):
        for block_name, slot, linear_names in QUANTIZED_INPUTS:
            block = getattr(layer, block_name)
            quantizer = getattr(block, slot)
            if quantizer is None:
                raise ValueError("integer kernels need quantized activations (2 to 8 bits); this model keeps "
                                 f"the input of layers.{i}.{block_name}.{linear_names[0]} in floating point")
            prefix = f"layers.{i}.{block_name}"
            for name in linear_names:
                linear = getattr(block, name)
                int_linear = IntLinear.from_quantized(
                    tensors[f"{prefix}.{name}.weight_int"], tensors[f"{prefix}.{name}.weight_scale"].reshape(-1),
                    tensors[f"{prefix}.{slot}.scale"].item(), tensors[f"{prefix}.{slot}.zero_point"].item(),
                    act_bits=quantizer.bits, weight_bits=linear.weight_quantizer.bits,
                    symmetric_act=quantizer.symmetric)
                setattr(block, name, int_linear.to(linear.weight.device))
                replaced += 1
            setattr(block, slot, None)
    return replaced


# ---------------------------------------------------------------------------------------------
# Benchmark


def cpu_flags() -> set[str]:
    """Return the CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def machine_info() -> dict:
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
            if f in flags]
    return {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "simd_flags": simd,
        "backend": select_backend(torch.device("cpu")),
        "w8a8_code_split": not fbgemm_products_fit_int16(8, 8),
    }


def time_interleaved(fns: dict[str, Callable[[], object]], budget_s: float,
                     min_repeats: int = 3) -> dict[str, float]:
    """Return the median milliseconds of each function over repeated rounds.

    Each round times every function once, in turn, so that load drift on a shared machine affects
    all of them alike. The first round is warmup and sets the repeat count: budget_s / round time,
    between min_repeats and 50.
    """
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - start
    repeats = max(min_repeats, min(50, int(budget_s / max(round_s, 1e-9))))

    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def random_int_linear(in_features: int, out_features: int, act_bits: int, weight_bits: int) -> IntLinear:
    w_max = 2 ** (weight_bits - 1)
    w_int = torch.randint(-w_max, w_max, (out_features, in_features), dtype=torch.int8)
    s_w = torch.rand(out_features) * 0.01 + 0.001
    return IntLinear.from_quantized(w_int, s_w, 0.05, 2 ** (act_bits - 1), act_bits, weight_bits, False)


def bench_one(in_features: int, out_features: int, token_counts, budget_s: float) -> list[dict]:
    """Time fp32 nn.Linear, W8A8 and W4A4 IntLinear (and bf16 on CPUs with native bf16) on one shape."""
    modules = {
        "fp32": nn.Linear(in_features, out_features, bias=False),
        "w8a8": random_int_linear(in_features, out_features, 8, 8),
        "w4a4": random_int_linear(in_features, out_features, 4, 4),
    }
    weight_bytes = {"fp32": 4 * in_features * out_features}
    if has_native_bf16():
        modules["bf16"] = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
        weight_bytes["bf16"] = 2 * in_features * out_features
    for name in ("w8a8", "w4a4"):
        weight_bytes[name] = modules[name]._int_matmul(torch.device("cpu")).weight_bytes

    rows = []
    with torch.inference_mode():
        for tokens in token_counts:
            x = torch.randn(tokens, in_features)
            inputs = {name: x.to(torch.bfloat16) if name == "bf16" else x for name in modules}
            fns = {name: (lambda m=m, i=inputs[name]: m(i)) for name, m in modules.items()}
            ms = time_interleaved(fns, budget_s)

            row = {"in_features": in_features, "out_features": out_features, "tokens": tokens}
            for name in modules:
                row[f"{name}_ms"] = ms[name]
                row[f"{name}_speedup"] = ms["fp32"] / ms[name]
                if tokens == 1:
                    row[f"{name}_gb_per_s"] = weight_bytes[name] / (ms[name] * 1e-3) / 1e9
            rows.append(row)
    return rows


def run_benchmark(shapes, token_counts, budget_s: float) -> dict:
    """Time every shape at every token count and return the machine info and result rows."""
    torch.manual_seed(0)
    results = []
    start = time.perf_counter()
    for index, (in_features, out_features) in enumerate(shapes):
        logger.info("shape %d/%d: %d -> %d, elapsed %.0f s",
                    index + 1, len(shapes), in_features, out_features, time.perf_counter() - start)
        results += bench_one(in_features, out_features, token_counts, budget_s)
    logger.info("benchmark done in %.0f s", time.perf_counter() - start)
    return {"machine": machine_info(), "results": results}


def format_table(report: dict) -> str:
    machine = report["machine"]
    names = [n for n in ("fp32", "bf16", "w8a8", "w4a4") if f"{n}_ms" in report["results"][0]]
    labels = {"fp32": "fp32", "bf16": "bf16", "w8a8": "W8A8", "w4a4": "W4A4"}
    lines = [
        f"CPU: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, SIMD: {' '.join(machine['simd_flags']) or 'none listed'}",
        f"integer back end: {machine['backend']}; W4A4 is INT4 values on INT8 units",
    ]
    if machine["w8a8_code_split"]:
        lines.append("W8A8 runs its 8-bit codes as two 4-bit halves (2x the integer work) to avoid int16 saturation")
    if "bf16" not in names:
        lines.append("bf16 not timed: the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)")
    lines.append("ms: median of interleaved repeats; x: speedup over fp32; GB/s (M = 1): weight bytes read / time")
    lines.append("")

    header = f"{'in -> out':>14} {'M':>5}"
    for name in names:
        header += f" {labels[name] + ' ms':>10}" + (f" {'x':>5}" if name != "fp32" else "")
    header += "  GB/s " + " / ".join(labels[n] for n in names)
    lines += [header, "-" * len(header)]

    for row in report["results"]:
        line = f"{row['in_features']:>6} -> {row['out_features']:<5} {row['tokens']:>5}"
        for name in names:
            line += f" {row[name + '_ms']:>10.3f}"
            if name != "fp32":
                line += f" {row[name + '_speedup']:>5.2f}"
        if row["tokens"] == 1:
            line += "  " + " / ".join(f"{row[n + '_gb_per_s']:.1f}" for n in names)
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Candidate CPU ops, the measurements behind select_backend


def candidate_ops(in_features: int, out_features: int, tokens: int) -> dict[str, Callable[[], object]]:
    """Build the CPU matmul candidates for one shape, with 4-bit weights and activation codes."""
    x = torch.randn(tokens, in_features)
    weight = torch.randn(out_features, in_features)
    codes = torch.randint(0, 16, (tokens, in_features), dtype=torch.uint8)
    w_int = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8)
    codes_float, w_float = codes.float(), w_int.float()
    centered = codes_float - 8
    codes_int8 = (codes.to(torch.int16) - 8).to(torch.int8)

    fbgemm = FbgemmMatmul(w_int, act_bits=4, weight_bits=4)
    onednn_weight = torch.ops.onednn.qlinear_prepack(w_int, [tokens, in_features])
    ones, zeros = torch.ones(out_features), torch.zeros(out_features, dtype=torch.int64)

    # Weight-only ops (float multiply after dequantizing in the kernel), timed for the W4A16 case.
    x_bf16 = x.to(torch.bfloat16)
    int8_scales = torch.ones(out_features, dtype=torch.bfloat16)
    group_size = 32
    int4_weight = torch._convert_weight_to_int4pack_for_cpu(w_int.to(torch.int32) + 8, 1)
    int4_scales_zeros = torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16)
    int4_scales_zeros[..., 0] = 1

    return {
        "fp32 F.linear": lambda: F.linear(x, weight),
        "fp32 F.linear on integer-valued codes": lambda: F.linear(codes_float, w_float),
        "torch._int_mm int8 x int8 -> int32": lambda: torch._int_mm(codes_int8, w_int.t()),
        "fbgemm quantized linear, fp32 out": lambda: fbgemm(centered, 8),
        "oneDNN qlinear_pointwise, fp32 out": lambda: torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 8, onednn_weight, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        ),
        "weight-only _weight_int8pack_mm, bf16": lambda: torch._weight_int8pack_mm(x_bf16, w_int, int8_scales),
        "weight-only _weight_int4pack_mm_for_cpu, bf16": lambda: torch._weight_int4pack_mm_for_cpu(
            x_bf16, int4_weight, group_size, int4_scales_zeros
        ),
    }


def run_candidates(in_features: int, out_features: int, token_counts, max_call_s: float) -> dict:
    """Time each candidate op at each token count.

    A candidate is skipped once one call would exceed max_call_s, estimated linearly from its time
    at the previous token count.
    """
    torch.manual_seed(0)
    results: dict[str, dict[int, float | None]] = {}
    previous: dict[str, tuple[int, float]] = {}
    for tokens in token_counts:
        logger.info("candidates at M=%d", tokens)
        for name, fn in candidate_ops(in_features, out_features, tokens).items():
            if name in previous:
                prev_tokens, prev_ms = previous[name]
                if prev_ms * tokens / prev_tokens > 1e3 * max_call_s:
                    results.setdefault(name, {})[tokens] = None
                    continue
            ms = time_interleaved({name: fn}, budget_s=2.0, min_repeats=1)[name]
            results.setdefault(name, {})[tokens] = ms
            previous[name] = (tokens, ms)
    return {"machine": machine_info(), "in_features": in_features, "out_features": out_features,
            "candidates": results}


def format_candidates(report: dict) -> str:
    token_counts = list(next(iter(report["candidates"].values())).keys())
    lines = [f"CPU: {report['machine']['cpu']}, {report['machine']['torch_threads']} threads, "
             f"{report['in_features']} -> {report['out_features']}, median ms ('-': skipped, too slow)"]
    lines.append(f"{'candidate':<48}" + "".join(f" {'M=' + str(m):>10}" for m in token_counts))
    for name, by_tokens in report["candidates"].items():
        cells = "".join(f" {'-' if ms is None else f'{ms:.3f}':>10}" for ms in by_tokens.values())
        lines.append(f"{name:<48}{cells}")
    return "\n".join(lines)


def checkpoint_shapes(config) -> list[tuple[int, int]]:
    """Return the (in, out) shapes of a Llama config's block linears, without repeats."""
    hidden, heads = config.hidden_size, config.num_attention_heads * config.head_dim
    kv, ff = config.num_key_value_heads * config.head_dim, config.intermediate_size
    return list(dict.fromkeys([(hidden, heads), (hidden, kv), (heads, hidden), (hidden, ff), (ff, hidden)]))


@torch.no_grad()
def prefill_benchmark(folder, seqlen: int, repeats: int = 3) -> dict:
    """Time one forward pass over ``seqlen`` tokens of a merged checkpoint: float weights against
    the integer linears built from its quantized export (online Hadamard and S_n in both)."""
    from safetensors.torch import load_file

    from fptquant import load_quantizers
    from model import load_model

    float_model = load_model(str(folder))
    tokens = torch.randint(0, float_model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    int_model = load_model(str(folder))
    qconfig = load_quantizers(int_model, folder)
    replace_linears_with_int(int_model, load_file(str(folder / int_model.config.fptquant["quantization"]["file"])))

    seconds = {}
    for name, model in (("float", float_model), ("integer", int_model)):
        model(tokens)  # warm-up, and the integer back end packs its weights here
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return {"checkpoint": str(folder), "config": qconfig.name, "seqlen": seqlen,
            "float_tokens_per_s": seqlen / seconds["float"], "integer_tokens_per_s": seqlen / seconds["integer"],
            "speedup": seconds["float"] / seconds["integer"],
            "note": "the integer model keeps fake-quantized KV cache and float attention, embedding and head"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--bench", action="store_true",
                      help="time fp32 nn.Linear against W8A8 and W4A4 IntLinear on model shapes")
    mode.add_argument("--candidates", action="store_true",
                      help="time the candidate CPU integer matmul ops on 4096 -> 4096")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--threads", type=int, default=None,
                        help="number of torch CPU threads (default: torch's default)")
    parser.add_argument("--budget", type=float, default=1.5,
                        help="seconds of timed repeats per shape and token count (default: 1.5)")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="a merged FPTQuant checkpoint folder (runs/<run>/merged): bench its linear shapes "
                             "and time its prefill, float against integer")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of the prefill timing (default: 2048)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")

    if args.bench:
        shapes = SMOLLM2_135M_SHAPES
        if args.ckpt is not None:
            from model import load_config

            if not (args.ckpt / "config.json").is_file():
                parser.error(f"--ckpt {args.ckpt}: config.json not found; pass a run's merged/ folder")
            shapes = checkpoint_shapes(load_config(args.ckpt))
        report = run_benchmark(shapes + [s for s in LLAMA2_7B_SHAPES if s not in shapes], BENCH_TOKEN_COUNTS, args.budget)
        if args.ckpt is not None:
            report["prefill"] = prefill_benchmark(args.ckpt, args.prefill_tokens)
        print(json.dumps(report) if args.json else format_table(report))
        if "prefill" in report and not args.json:
            p = report["prefill"]
            print(f"\nprefill of {p['seqlen']} tokens, {p['checkpoint']} ({p['config']}): float "
                  f"{p['float_tokens_per_s']:.0f} tokens/s, integer {p['integer_tokens_per_s']:.0f} tokens/s, "
                  f"speedup {p['speedup']:.2f}x ({p['note']})")
    else:
        report = run_candidates(4096, 4096, BENCH_TOKEN_COUNTS, max_call_s=15.0)
        print(json.dumps(report) if args.json else format_candidates(report))


if __name__ == "__main__":
    main()
