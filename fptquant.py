"""FPTQuant: function-preserving transforms for static INT4 quantization of Llama models.

FPTQuant (van Breugel, Bondarenko, Whatmough and Nagel, arXiv 2506.04985) inserts pairs of
operations that cancel exactly in full precision, so the model computes the same function. The
transforms reshape the weights, activations and KV cache so that they have fewer outliers. After
training, every transform except a grouped Hadamard before down_proj and a per-token scaling is
merged into the weights, and the model runs with static (calibrated, fixed) quantization ranges.

Sections of this file:

- Quantizers: uniform integer fake quantization (static or dynamic; per-tensor, per-channel or
  per-token) with straight-through and LSQ gradients, range calibration, and the W/A/KV config.
- Hadamard matrices: Sylvester x Paley constructions that initialise the residual rotation, and
  the grouped Walsh-Hadamard transform applied online before down_proj.
- Transforms: the function-preserving transforms and their parametrisations.
- Folding and merging: RMSNorm gain folding, and merging the trained transforms into the weights.
"""

import copy
import logging
import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize

log = logging.getLogger("fptquant")


# ----------------------------------------------------------------------------------------------
# Quantizers

# Smallest scale used in the forward pass, so that a collapsed range cannot divide by zero.
SCALE_MIN = 1e-8

# The clipping search shrinks the observed range by a ratio in [SEARCH_MIN_RATIO, 1]. It tries
# SEARCH_COARSE_RATIOS evenly spaced ratios, then SEARCH_FINE_RATIOS around the best one per row,
# within one coarse step: about 1/200 resolution for 41 passes instead of 200.
SEARCH_MIN_RATIO = 0.3
SEARCH_COARSE_RATIOS = 20
SEARCH_FINE_RATIOS = 21

RANGE_METHODS = ("minmax", "search")
GRANULARITIES = ("tensor", "channel", "token")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer (ties to even) with the straight-through estimator (gradient 1)."""
    return x + (torch.round(x) - x).detach()


def integer_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Return (qmin, qmax): signed [-2^(b-1), 2^(b-1) - 1] if symmetric, else unsigned [0, 2^b - 1]."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
                  qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize: x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s.

    The rounding passes gradients straight through, and the clamp is ordinary autograd, so the
    gradient to x is 1 inside the grid and 0 where the value is clipped. The gradient to the scale
    is then LSQ's: round(x/s) - x/s inside the grid, qmin - z or qmax - z where clipped.
    ``zero_point`` must already contain integer values (rounded with ``round_ste`` if it is learned).
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def range_to_scale(low: torch.Tensor, high: torch.Tensor, bits: int,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the scale and zero point (None if symmetric) that map [low, high] onto the grid.

    Expects low <= 0 <= high. Symmetric: scale = max(-low, high) / qmax, so the absolute maximum
    lands on qmax = 2^(b-1) - 1 and qmin = -2^(b-1) is reached only by clipped values.
    Asymmetric: scale = (high - low) / (2^b - 1) and zero point = round(-low / scale), so that
    0 is exactly representable.
    """
    qmin, qmax = integer_grid(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-low, high) / qmax
        return scale.clamp(min=SCALE_MIN), None

    scale = ((high - low) / (qmax - qmin)).clamp(min=SCALE_MIN)
    zero_point = torch.clamp(torch.round(-low / scale), qmin, qmax)
    return scale, zero_point


@torch.no_grad()
def search_range(values: torch.Tensor, bits: int, symmetric: bool, method: str = "search",
                 p: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose a scale and zero point for each row of ``values`` (C, N).

    The range of a row is [min(row, 0), max(row, 0)]. "minmax" uses that range. "search" shrinks
    both ends by ratios in SEARCH_MIN_RATIO..1 (a coarse grid, then a fine one) and keeps, per
    row, the ratio with the smallest mean |x - x_hat|^p over the row. Returns tensors of shape (C,).
    """
    if method not in RANGE_METHODS:
        raise ValueError(f"invalid range method {method!r}: expected one of {', '.join(RANGE_METHODS)}")
    low = values.amin(dim=1).clamp(max=0)
    high = values.amax(dim=1).clamp(min=0)
    if method == "minmax":
        return range_to_scale(low, high, bits, symmetric)

    best = {"error": torch.full_like(low, math.inf), "ratio": torch.ones_like(low)}
    for ratio in torch.linspace(SEARCH_MIN_RATIO, 1.0, SEARCH_COARSE_RATIOS).tolist():
        _try_ratio(values, low, high, torch.full_like(low, ratio), bits, symmetric, p, best)
    step = (1.0 - SEARCH_MIN_RATIO) / (SEARCH_COARSE_RATIOS - 1)
    coarse_best = best["ratio"].clone()
    for offset in torch.linspace(-step, step, SEARCH_FINE_RATIOS).tolist():
        ratio = (coarse_best + offset).clamp(SEARCH_MIN_RATIO, 1.0)
        _try_ratio(values, low, high, ratio, bits, symmetric, p, best)
    return range_to_scale(best["ratio"] * low, best["ratio"] * high, bits, symmetric)


def _try_ratio(values, low, high, ratio, bits, symmetric, p, best) -> None:
    """Quantize each row of values with its range shrunk by ``ratio`` (C,); keep the rows that improve."""
    qmin, qmax = integer_grid(bits, symmetric)
    scale, zero_point = range_to_scale(ratio * low, ratio * high, bits, symmetric)
    zero_column = 0.0 if symmetric else zero_point[:, None]

    # fake_quantize's formula, in place because this loop dominates calibration time.
    x_hat = values / scale[:, None]                                            # (C, N)
    x_hat.round_().add_(zero_column).clamp_(qmin, qmax).sub_(zero_column).mul_(scale[:, None])
    error = x_hat.sub_(values).abs_().pow_(p).mean(dim=1)                      # (C,)

    better = error < best["error"]
    best["error"] = torch.where(better, error, best["error"])
    best["ratio"] = torch.where(better, ratio, best["ratio"])


class Quantizer(nn.Module):
    """Uniform integer fake quantization of a tensor, static or dynamic.

    Grid: symmetric quantizers use signed integers [-2^(b-1), 2^(b-1) - 1] (INT4: [-8, 7]) with
    zero point 0. Asymmetric ones use unsigned integers [0, 2^b - 1] with an integer zero point.
    Ranges always contain 0 (see ``range_to_scale`` for the scale conventions).

    Granularity: "tensor" keeps one scale. "channel" keeps one scale per index of ``channel_dim``,
    e.g. channel_dim=0 for a weight (out, in), whose scale then broadcasts as (out, 1). "token"
    keeps one scale per vector along the last dimension and must be dynamic.

    Static quantizers hold ``scale`` (and, if asymmetric, ``zero_point``) as parameters trained
    LSQ-style through ``fake_quantize``; no LSQ gradient scaling is applied. They must be
    initialised before use, from calibration data (``observe`` then ``init_range``) or from a
    weight (``init_from_tensor``). The zero point is stored as a float and rounded with the
    straight-through estimator in the forward pass. Dynamic quantizers take the min-max range
    from each input and hold no parameters. Their ranges are detached, so the gradient to the
    input is that of the rounding and clamping only.

    Switches: ``enabled = False`` makes the forward an identity (for ablations), and
    ``observing = True`` makes it an identity that also records the input for calibration
    (dynamic quantizers record nothing). The fake quantization computes in float32, or in float64
    for float64 inputs, and returns the input's dtype.
    """

    def __init__(self, bits: int, symmetric: bool, granularity: str, dynamic: bool = False,
                 channel_dim: int | None = None, num_channels: int | None = None, *,
                 sample_size: int = 2**16, seed: int = 0):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"invalid bit width {bits!r}: expected an integer in 2..8 "
                             "(for 16 bits, use no quantizer)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"invalid granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        if granularity == "token" and not dynamic:
            raise ValueError("per-token quantization must be dynamic: the number of tokens changes "
                             "with each input, so no static range can be kept per token")
        if granularity == "channel":
            if channel_dim is None:
                raise ValueError("per-channel quantization needs channel_dim, the dimension that keeps its own scale")
            if not dynamic and (not isinstance(num_channels, int) or num_channels <= 0):
                raise ValueError(f"static per-channel quantization needs num_channels, the size of dimension "
                                 f"{channel_dim}, as a positive integer; got {num_channels!r}")
        elif channel_dim is not None or num_channels is not None:
            raise ValueError(f"channel_dim and num_channels apply only to per-channel quantization, "
                             f"but granularity is {granularity!r}")
        if not isinstance(sample_size, int) or sample_size <= 0:
            raise ValueError(f"invalid sample_size {sample_size!r}: expected a positive number of values")

        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity
        self.dynamic = dynamic
        self.channel_dim = channel_dim
        self.num_channels = num_channels
        self.qmin, self.qmax = integer_grid(bits, symmetric)
        self.enabled = True
        self.observing = False

        if dynamic:
            self.register_parameter("scale", None)
            self.register_parameter("zero_point", None)
        else:
            shape = (num_channels,) if granularity == "channel" else ()
            self.scale = nn.Parameter(torch.ones(shape))
            self.zero_point = None if symmetric else nn.Parameter(torch.zeros(shape))
        # Set by init_range / init_from_tensor; saved in the state dict as extra state.
        self.initialized = dynamic

        # Calibration statistics per row (one row per channel, or one row in all): exact running
        # min and max, and a uniform random subsample of at most sample_size values in all (but
        # at least one per channel). The range search costs 100 passes over the subsample: 2^16
        # values take about 0.1 s on one thread of a shared AMD EPYC, 2^20 values about 1.5 s.
        self.sample_size = sample_size
        self.generator = torch.Generator().manual_seed(seed)
        self.reset_observations()

    def extra_repr(self) -> str:
        text = f"bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity}"
        if self.granularity == "channel":
            text += f", channel_dim={self.channel_dim}"
        text += f", static={not self.dynamic}"
        if not self.enabled:
            text += ", enabled=False"
        return text

    def get_extra_state(self) -> dict:
        return {"initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        self.initialized = state["initialized"]

    # -- fake quantization ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            if not self.dynamic:
                self.observe(x)
            return x
        if not self.enabled:
            return x

        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        scale, zero_point = self.scale_and_zero_point(x)
        zero_point = 0.0 if zero_point is None else zero_point
        return fake_quantize(x.to(compute_dtype), scale, zero_point, self.qmin, self.qmax).to(x.dtype)

    def scale_and_zero_point(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the scale and zero point (None if symmetric) for ``x``, shaped to broadcast against it."""
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.dynamic:
            return self._dynamic_scale_and_zero_point(x.detach().to(compute_dtype))

        if not self.initialized:
            raise RuntimeError(f"static quantizer ({self.extra_repr()}) is used before its range was set: "
                               "calibrate it first with observe() and init_range(), or with "
                               "init_from_tensor() for a weight")
        self._check_channels(x)
        scale = self._broadcast(self.scale.to(compute_dtype).clamp(min=SCALE_MIN), x)
        if self.symmetric:
            return scale, None
        zero_point = torch.clamp(round_ste(self.zero_point.to(compute_dtype)), self.qmin, self.qmax)
        return scale, self._broadcast(zero_point, x)

    def _dynamic_scale_and_zero_point(self, x: torch.Tensor):
        if self.granularity == "token":
            low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)   # (..., 1)
        elif self.granularity == "tensor":
            low, high = x.amin(), x.amax()
        else:
            reduced = [d for d in range(x.ndim) if d != self.channel_dim % x.ndim]
            low, high = x.amin(dim=reduced, keepdim=True), x.amax(dim=reduced, keepdim=True)
        return range_to_scale(low.clamp(max=0), high.clamp(min=0), self.bits, self.symmetric)

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a per-channel vector (C,) to broadcast along ``channel_dim`` of ``x``, e.g. (C, 1)."""
        if self.granularity == "tensor":
            return value
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return value.reshape(shape)

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.granularity == "channel" and x.shape[self.channel_dim] != self.num_channels:
            raise ValueError(f"quantizer expects {self.num_channels} channels in dimension {self.channel_dim}, "
                             f"got a tensor of shape {tuple(x.shape)}")

    # -- integer export ------------------------------------------------------------------------

    @torch.no_grad()
    def quantize_to_int(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return integer codes, scale and zero point with x_hat = (codes - zero_point) * scale.

        Codes and zero point are int8 for symmetric quantizers and uint8 for asymmetric ones,
        which contain every grid up to 8 bits. The scale is float32 (float64 for float64 inputs),
        shaped to broadcast against ``x``. The ``enabled`` switch does not apply here.
        """
        scale, zero_point = self.scale_and_zero_point(x)
        if zero_point is None:
            zero_point = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(x.to(scale.dtype) / scale) + zero_point, self.qmin, self.qmax)
        integer_dtype = torch.int8 if self.symmetric else torch.uint8
        return codes.to(integer_dtype), scale, zero_point.to(integer_dtype)

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Map integer codes back to real values: (codes - zero_point) * scale."""
        return (codes.to(scale.dtype) - zero_point.to(scale.dtype)) * scale

    # -- range initialisation ------------------------------------------------------------------

    def reset_observations(self) -> None:
        """Drop the calibration statistics collected by ``observe``."""
        self.observed_min = None      # (C,)
        self.observed_max = None      # (C,)
        self.samples = None           # (C, K) with K <= max(1, sample_size // C)
        self.num_observed = 0         # values per row seen so far

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record ``x`` for range calibration, in bounded memory.

        Keeps the exact min and max per row and a uniform random subsample of the values
        (reservoir sampling, Algorithm R, drawn from a generator seeded at construction, so the
        same inputs give the same sample). A per-channel quantizer samples whole columns, so that
        every channel keeps values from the same positions.
        """
        if self.dynamic:
            raise RuntimeError(f"dynamic quantizer ({self.extra_repr()}) takes its range from each input "
                               "and has nothing to observe")
        self._check_channels(x)
        rows = self._rows(x.detach()).float()                   # (C, M)

        low, high = rows.amin(dim=1), rows.amax(dim=1)
        if self.observed_min is None:
            self.observed_min, self.observed_max = low, high
        else:
            self.observed_min = torch.minimum(self.observed_min, low)
            self.observed_max = torch.maximum(self.observed_max, high)
        self._add_to_reservoir(rows)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` as (C, M): one row per channel for per-channel quantizers, else one row."""
        if self.granularity == "channel":
            return x.movedim(self.channel_dim, 0).reshape(self.num_channels, -1)
        return x.reshape(1, -1)

    def _add_to_reservoir(self, rows: torch.Tensor) -> None:
        num_rows, count = rows.shape
        capacity = max(1, self.sample_size // num_rows)
        if self.samples is None:
            self.samples = rows.new_empty(num_rows, 0)

        # Fill the reservoir first.
        free = capacity - self.samples.shape[1]
        if free > 0:
            head = rows[:, :free]
            self.samples = torch.cat([self.samples, head], dim=1)
            self.num_observed += head.shape[1]
            rows = rows[:, free:]
            count = rows.shape[1]
        if count == 0:
            return

        # Algorithm R: the column with stream index t (from 0) draws a slot uniformly from 0..t and
        # replaces that slot if it exists. When several columns of this batch draw the same slot,
        # the latest one wins, as it would if they were processed one by one.
        stream_index = torch.arange(self.num_observed, self.num_observed + count, dtype=torch.float64)
        draws = torch.rand(count, generator=self.generator, dtype=torch.float64)
        slots = torch.floor(draws * (stream_index + 1)).long()
        accepted = torch.nonzero(slots < capacity).squeeze(1)
        latest = torch.full((capacity,), -1, dtype=torch.long)
        latest.scatter_reduce_(0, slots[accepted], accepted, reduce="amax")
        replaced = torch.nonzero(latest >= 0).squeeze(1)

        device = self.samples.device
        self.samples[:, replaced.to(device)] = rows[:, latest[replaced].to(device)]
        self.num_observed += count

    @torch.no_grad()
    def init_range(self, method: str = "search", p: float = 2.4) -> None:
        """Set the scale and zero point from the observed values, then drop the observations.

        The search runs over the subsample together with the exact min and max, so the tails
        always count. See ``search_range`` for the methods.
        """
        if self.dynamic:
            raise RuntimeError(f"dynamic quantizer ({self.extra_repr()}) has no range to initialise")
        if self.samples is None:
            raise RuntimeError(f"quantizer ({self.extra_repr()}) has observed no data: call observe(), or run "
                               "calibration inputs with observing=True, before init_range()")
        values = torch.cat([self.samples, self.observed_min[:, None], self.observed_max[:, None]], dim=1)
        self._set_range(values, method, p)
        self.reset_observations()

    @torch.no_grad()
    def init_from_tensor(self, w: torch.Tensor, method: str = "search", p: float = 2.4) -> None:
        """Set the scale and zero point from all values of ``w`` (a weight), searched per channel."""
        if self.dynamic:
            raise RuntimeError(f"dynamic quantizer ({self.extra_repr()}) has no range to initialise")
        self._check_channels(w)
        self._set_range(self._rows(w.detach()).float(), method, p)

    def _set_range(self, values: torch.Tensor, method: str, p: float) -> None:
        scale, zero_point = search_range(values, self.bits, self.symmetric, method, p)
        self.scale.copy_(scale.reshape(self.scale.shape))
        if not self.symmetric:
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.initialized = True


VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
CONFIG_NAME_HELP = ("expected W<bits>A<bits>KV<bits> with bits in 2..8 or 16 (16 keeps floating point), "
                    "e.g. W4A4KV4, W4A8KV8, W4A16KV16 or W8A8KV8")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of weights, activations and KV cache; 16 means floating point (no quantizer)."""

    weight_bits: int
    act_bits: int
    kv_bits: int

    def __post_init__(self):
        for field_name in ("weight_bits", "act_bits", "kv_bits"):
            value = getattr(self, field_name)
            if value not in VALID_BITS:
                raise ValueError(f"invalid {field_name} {value!r}: expected an integer in 2..8, or 16 for "
                                 "floating point")

    @classmethod
    def from_name(cls, name: str) -> "QuantConfig":
        """Parse a name such as "W4A4KV4" (case-insensitive)."""
        match = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", name.strip(), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"invalid quantization config {name!r}: {CONFIG_NAME_HELP}")
        bits = [int(group) for group in match.groups()]
        if any(b not in VALID_BITS for b in bits):
            raise ValueError(f"invalid bit width in quantization config {name!r}: {CONFIG_NAME_HELP}")
        return cls(*bits)

    @property
    def name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}KV{self.kv_bits}"

    def with_overrides(self, wbits: int | None = None, abits: int | None = None,
                       kvbits: int | None = None) -> "QuantConfig":
        """Return a copy with the given bit widths replaced; None keeps the current value."""
        return replace(self,
                       weight_bits=self.weight_bits if wbits is None else wbits,
                       act_bits=self.act_bits if abits is None else abits,
                       kv_bits=self.kv_bits if kvbits is None else kvbits)


def weight_quantizer(bits: int, out_features: int) -> Quantizer | None:
    """Return a symmetric, per-output-channel static quantizer for a weight (out, in); None for 16 bits."""
    if bits == 16:
        return None
    return Quantizer(bits, symmetric=True, granularity="channel", channel_dim=0, num_channels=out_features)


def activation_quantizer(bits: int) -> Quantizer | None:
    """Return an asymmetric per-tensor static quantizer for a linear's input; None for 16 bits."""
    if bits == 16:
        return None
    return Quantizer(bits, symmetric=False, granularity="tensor")


def kv_quantizer(bits: int) -> Quantizer | None:
    """Return an asymmetric per-tensor static quantizer for keys or values; None for 16 bits."""
    if bits == 16:
        return None
    return Quantizer(bits, symmetric=False, granularity="tensor")


# ----------------------------------------------------------------------------------------------
# Hadamard matrices
#
# A Hadamard matrix of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal and
# spreads any single outlier channel evenly over all n channels. An order above 2 must be a
# multiple of 4. This file builds n = 2^k * m as the Kronecker product of a Sylvester matrix
# of order 2^k and a Paley matrix of order m (or m = 1).


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def jacobsthal_matrix(q: int) -> torch.Tensor:
    """Return Q (q, q) with Q[i, j] = chi(j - i), where chi is the Legendre symbol modulo the prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def paley_matrix(m: int) -> torch.Tensor | None:
    """Return a +-1 Hadamard matrix of order m from Paley's constructions, or None if neither applies.

    Paley I, m = q + 1 with a prime q = 3 (mod 4): Q is skew-symmetric, S = [[0, 1^T], [-1, Q]]
    satisfies S S^T = q I and S^T = -S, so H = I + S has H H^T = I + S S^T = m I.
    Paley II, m = 2 (q + 1) with a prime q = 1 (mod 4): Q is symmetric, C = [[0, 1^T], [1, Q]] is
    a symmetric conference matrix, and H replaces each 0 of C by [[1, -1], [-1, -1]] and each +-1
    by +-[[1, 1], [1, -1]].
    """
    q = m - 1
    if is_prime(q) and q % 4 == 3:
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:] = 1.0
        S[1:, 0] = -1.0
        S[1:, 1:] = jacobsthal_matrix(q)
        return torch.eye(m, dtype=torch.float64) + S

    q = m // 2 - 1
    if m % 2 == 0 and is_prime(q) and q % 4 == 1:
        C = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        C[0, 1:] = 1.0
        C[1:, 0] = 1.0
        C[1:, 1:] = jacobsthal_matrix(q)
        on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        on_sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, on_sign) + torch.kron(torch.eye(m // 2, dtype=torch.float64), on_zero)
    return None


def sylvester_matrix(order: int) -> torch.Tensor:
    """Return the +-1 Sylvester-Hadamard matrix of a power-of-two order: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    H = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < order:
        H = torch.kron(base, H)
    return H


def largest_power_of_two_divisor(n: int) -> int:
    """Return the largest power of two that divides n, e.g. 1536 -> 512."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"expected a positive integer, got {n!r}")
    return n & -n


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """Return an orthogonal Hadamard matrix of order n (entries +-1/sqrt(n), float64), or None.

    Tries n = 2^k * m with the smallest m first: m = 1 (Sylvester alone), or a Paley order, e.g.
    576 = 16 * 36 with Paley II at q = 17. Returns None when no such split exists (e.g. 92, 22).
    NOTE: Paley's constructions also work for prime powers q, and other families cover more
    orders (92, for example, has a Williamson matrix). This function uses only primes q.
    """
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    power = largest_power_of_two_divisor(n)
    while power >= 1:
        m = n // power
        core = torch.ones(1, 1, dtype=torch.float64) if m == 1 else paley_matrix(m)
        if core is not None:
            return torch.kron(sylvester_matrix(power), core) / math.sqrt(n)
        power //= 2
    return None


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a random orthogonal matrix (n, n), float64, from the QR of a Gaussian matrix.

    Multiplying Q's columns by the signs of R's diagonal makes the QR unique, so the result is
    Haar-distributed.
    """
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    return Q * torch.sign(torch.diagonal(R))


def residual_rotation_init(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str]:
    """Return the initial residual rotation (n, n), float64, and "hadamard" or "random orthogonal"."""
    H = hadamard_matrix(n)
    if H is not None:
        return H, "hadamard"
    log.warning("no Sylvester x Paley Hadamard matrix of order %d: the residual rotation starts from a "
                "random orthogonal matrix instead", n)
    return random_orthogonal(n, generator), "random orthogonal"


@lru_cache(maxsize=16)
def normalised_sylvester(order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return the Sylvester-Hadamard matrix divided by sqrt(order), cached per dtype and device."""
    return (sylvester_matrix(order) / math.sqrt(order)).to(dtype=dtype, device=device)


def grouped_walsh_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Multiply each consecutive block of ``block`` channels of x (..., n) by the normalised H_block.

    This is x @ blockdiag(H, ..., H) with H the Sylvester matrix of order ``block`` over
    sqrt(block). H is symmetric and orthogonal, so it is its own inverse: applying the transform
    twice gives x back, and a linear that reads the transformed input keeps its output with
    W <- W @ blockdiag(H, ..., H). Computes in float32 (float64 for float64 inputs) and returns
    x's dtype.
    """
    if block <= 0 or block & (block - 1):
        raise ValueError(f"Walsh-Hadamard block size must be a power of two, got {block}")
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the block size {block}")

    # Batched matmul, measured faster on CPU: 49-85 ms vs 262-484 ms for a butterfly FWHT
    # (x (4, 512, 1536) float32, block 512, torch 2.13, 2 shared CPU threads, two runs).
    # Low-precision inputs are upcast because the same matmul in bfloat16 took 4-5 s there.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    H = normalised_sylvester(block, compute_dtype, x.device)
    blocks = x.to(compute_dtype).reshape(*x.shape[:-1], x.shape[-1] // block, block)  # (..., n / block, block)
    return (blocks @ H).reshape(x.shape).to(x.dtype)

# ----------------------------------------------------------------------------------------------
# Transforms
#
# Each transform is a pair of operations that cancel in full precision. It has two faces:
# ``merge`` folds the pair into the weights (differentiably, so training uses the weights that
# will be quantized), and an online face that applies the pair to activations through the slots
# of model.py. Tests check that both faces leave the logits unchanged.


def orthogonal_parameter(module: nn.Module, name: str, init: torch.Tensor) -> None:
    """Register ``init`` (a matrix or a batch of matrices) as a trainable orthogonal parameter."""
    module.register_parameter(name, nn.Parameter(init.clone()))
    parametrizations.orthogonal(module, name)
    setattr(module, name, init)


class ResidualRotation(nn.Module):
    """An orthogonal R applied to the whole residual stream.

    A bare RMSNorm commutes with R (rms(x R) = rms(x)), so if the embedding writes x R, every
    linear that reads the stream uses W R, and every linear that writes to it uses R^T W, the
    logits are unchanged: (x R)(W R)^T = x W^T.
    """

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        init, self.init_kind = residual_rotation_init(dim, generator)
        orthogonal_parameter(self, "matrix", init.float())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Online face after the embedding: x -> x R (the same as the merged E R)."""
        return x @ self.matrix.to(x.dtype)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Online face before the output head: x -> x R^T (the same as the merged W R)."""
        return x @ self.matrix.to(x.dtype).T


class PreRopeTransform(nn.Module):
    """T_k: per KV head and RoPE pair, keys get s R(theta) and queries s^-1 R(theta).

    On a pair (x_i, x_{i+d_h/2}) read as the complex number x_i + j x_{i+d_h/2}, s R(theta) is
    multiplication by s e^{j theta}, which commutes with RoPE's e^{j m omega_i}. The score is
    Re(conj(q') k') = Re(conj(q e^{j theta} / s) k s e^{j theta}) = Re(conj(q) k), so it is unchanged.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_rep = n_heads // n_kv_heads
        self.log_scale = nn.Parameter(torch.zeros(n_kv_heads, head_dim // 2))
        self.angle = nn.Parameter(torch.zeros(n_kv_heads, head_dim // 2))

    def key_params(self):
        return self.log_scale.exp(), self.angle

    def query_params(self):
        # Query head j belongs to KV head j // n_rep (HF's repeat_kv order).
        scale = (-self.log_scale).exp().repeat_interleave(self.n_rep, dim=0)
        return scale, self.angle.repeat_interleave(self.n_rep, dim=0)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """Online face: q (B, H, T, d_h), k (B, H_kv, T, d_h), before RoPE."""
        return turn_pairs(q, *self.query_params()), turn_pairs(k, *self.key_params())


def turn_pairs(x: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Multiply each RoPE pair of x (..., H, T, d_h) by scale * e^{j angle}, both (H, d_h/2)."""
    re, im = x.chunk(2, dim=-1)                                 # (..., H, T, d_h/2) each
    scale, cos, sin = scale[:, None, :], angle.cos()[:, None, :], angle.sin()[:, None, :]
    return torch.cat([scale * (cos * re - sin * im), scale * (sin * re + cos * im)], dim=-1)


def turn_rows(weight: torch.Tensor, n_heads: int, scale, angle) -> torch.Tensor:
    """Apply ``turn_pairs`` to the output channels of a q_proj/k_proj weight (H * d_h, in)."""
    out_features, in_features = weight.shape
    heads = weight.T.reshape(in_features, n_heads, 1, out_features // n_heads)  # (in, H, 1, d_h)
    return turn_pairs(heads, scale.to(weight.dtype), angle.to(weight.dtype)).reshape(in_features, -1).T


class ValueTransform(nn.Module):
    """T_v: per KV head an invertible M_h = U diag(e^a) V^T on values, M_h^-1 before o_proj.

    Attention mixes values over tokens by left multiplication, so a right multiplication of
    the values passes through: softmax(P) (V M) M^-1 = softmax(P) V. The factored form keeps M
    invertible with an exact inverse V diag(e^-a) U^T, and |a| <= log(max_condition) / 2 bounds
    the condition number by ``max_condition``.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, max_condition: float = 100.0):
        super().__init__()
        self.n_rep = n_heads // n_kv_heads
        self.max_log_scale = math.log(max_condition) / 2
        eye = torch.eye(head_dim).repeat(n_kv_heads, 1, 1)
        orthogonal_parameter(self, "left", eye)
        orthogonal_parameter(self, "right", eye)
        self.raw_log_scale = nn.Parameter(torch.zeros(n_kv_heads, head_dim))

    def log_scale(self) -> torch.Tensor:
        return self.max_log_scale * torch.tanh(self.raw_log_scale / self.max_log_scale)

    def matrix(self) -> torch.Tensor:
        """M_h for every KV head, (H_kv, d_h, d_h)."""
        return self.left * self.log_scale().exp()[:, None, :] @ self.right.transpose(-1, -2)

    def inverse(self) -> torch.Tensor:
        """M_h^-1 for every KV head, (H_kv, d_h, d_h)."""
        return self.right * (-self.log_scale()).exp()[:, None, :] @ self.left.transpose(-1, -2)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Online face on values v (B, H_kv, T, d_h)."""
        return v @ self.matrix().to(v.dtype)

    def undo(self, out: torch.Tensor) -> torch.Tensor:
        """Online face on the attention output (B, H, T, d_h) of every query head."""
        return out @ self.inverse().repeat_interleave(self.n_rep, dim=0).to(out.dtype)


class MLPScale(nn.Module):
    """T_u: up_proj outputs times s = e^a, down_proj inputs divided by s.

    down(silu(gate(x)) * (up(x) s) / s) = down(silu(gate(x)) * up(x)): the up branch enters the
    product linearly. The gate cannot be scaled because SiLU is not linear.
    """

    def __init__(self, intermediate_size: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(intermediate_size))

    def forward(self, up: torch.Tensor) -> torch.Tensor:
        return up * self.log_scale.exp().to(up.dtype)

    def undo(self, h: torch.Tensor) -> torch.Tensor:
        return h * (-self.log_scale).exp().to(h.dtype)


class DownHadamard(nn.Module):
    """The grouped Walsh-Hadamard H before down_proj: online x -> x H, merged W -> W H.

    H is orthogonal, so (x H)(W H)^T = x W^T. H is symmetric and its own inverse.
    """

    def __init__(self, intermediate_size: int):
        super().__init__()
        self.block = largest_power_of_two_divisor(intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_walsh_hadamard(x, self.block)

    def extra_repr(self) -> str:
        return f"block={self.block}"


TRANSFORM_NAMES = ("rotation", "tk", "tv", "tu", "hadamard", "sn")


class Transforms(nn.Module):
    """Every FPTQuant transform of one model; ``enabled`` picks a subset for ablations."""

    def __init__(self, config, enabled=TRANSFORM_NAMES, seed: int = 0):
        super().__init__()
        unknown = set(enabled) - set(TRANSFORM_NAMES)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}; known: {', '.join(TRANSFORM_NAMES)}")
        self.config = config
        self.enabled = tuple(name for name in TRANSFORM_NAMES if name in enabled)
        layers = range(config.num_hidden_layers)
        heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        generator = torch.Generator().manual_seed(seed)

        self.rotation = ResidualRotation(config.hidden_size, generator) if "rotation" in enabled else None
        self.pre_rope = nn.ModuleList(PreRopeTransform(*heads) for _ in layers) if "tk" in enabled else None
        self.value = nn.ModuleList(ValueTransform(*heads) for _ in layers) if "tv" in enabled else None
        self.mlp_scale = (nn.ModuleList(MLPScale(config.intermediate_size) for _ in layers)
                          if "tu" in enabled else None)
        self.hadamard = DownHadamard(config.intermediate_size) if "hadamard" in enabled else None
        self.dynamic_scaling = "sn" in enabled

    def online_parts(self) -> dict:
        """Return the parts that stay online after merging, as a merged checkpoint's config stores them."""
        return {"down_proj_hadamard_block": self.hadamard.block if self.hadamard else None,
                "dynamic_scaling": self.dynamic_scaling}

    def merged_weights(self, weights: dict[str, torch.Tensor],
                       embedding_and_head: bool = True) -> dict[str, torch.Tensor]:
        """Return every weight with the mergeable transforms folded in, differentiably.

        ``weights`` are a model's parameters by name, with the RMSNorm gains already folded when
        the rotation is on. With ``embedding_and_head=False`` the embedding and the head are left
        as they are, for a caller that applies R to the residual stream online instead (cheaper
        in training: T x d x d per step, against V x d x d for the two weights).
        """
        merged = dict(weights)
        if self.rotation is not None and embedding_and_head:
            R = self.rotation.matrix
            merged["embed_tokens.weight"] = weights["embed_tokens.weight"] @ R
            merged["lm_head.weight"] = weights["lm_head.weight"] @ R

        for i in range(self.config.num_hidden_layers):
            p = f"layers.{i}."
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                merged[p + name + ".weight"] = self.merged_linear(i, name, weights[p + name + ".weight"])
        return merged

    def merged_linear(self, layer: int, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Fold every enabled transform into the weight (out, in) of linear ``name`` of ``layer``."""
        config = self.config
        if self.rotation is not None:
            R = self.rotation.matrix.to(weight.dtype)
            weight = R.T @ weight if name in ("self_attn.o_proj", "mlp.down_proj") else weight @ R

        if self.pre_rope is not None and name in ("self_attn.q_proj", "self_attn.k_proj"):
            tk = self.pre_rope[layer]
            if name == "self_attn.q_proj":
                weight = turn_rows(weight, config.num_attention_heads, *tk.query_params())
            else:
                weight = turn_rows(weight, config.num_key_value_heads, *tk.key_params())

        if self.value is not None and name == "self_attn.v_proj":
            # Each KV head's values v_h M_h come from rows M_h^T W_h.
            heads = weight.view(config.num_key_value_heads, config.head_dim, -1)          # (H_kv, d_h, in)
            weight = (self.value[layer].matrix().transpose(-1, -2).to(weight.dtype) @ heads).reshape(weight.shape)
        if self.value is not None and name == "self_attn.o_proj":
            # Each query head's input columns W_j become W_j M^-T of its KV head.
            inverse = self.value[layer].inverse().repeat_interleave(self.value[layer].n_rep, dim=0)
            columns = weight.view(weight.shape[0], config.num_attention_heads, config.head_dim)  # (out, H, d_h)
            weight = torch.einsum("ohd,hed->ohe", columns, inverse.to(weight.dtype)).reshape(weight.shape)

        if self.mlp_scale is not None and name == "mlp.up_proj":
            weight = weight * self.mlp_scale[layer].log_scale.exp().to(weight.dtype)[:, None]
        if self.mlp_scale is not None and name == "mlp.down_proj":
            weight = weight * (-self.mlp_scale[layer].log_scale).exp().to(weight.dtype)
        if self.hadamard is not None and name == "mlp.down_proj":
            weight = self.hadamard(weight)
        return weight


# ----------------------------------------------------------------------------------------------
# Norm folding, online slots and merging


def fold_norms(model) -> None:
    """Fold every RMSNorm gain g into the linears that read the norm (W <- W diag(g)), set g = 1.

    Afterwards every norm computes the bare x / rms(x), which commutes with an orthogonal R and is
    invariant to a positive per-token scale. Exact in exact arithmetic.
    """
    with torch.no_grad():
        for layer in model.layers:
            readers = {layer.input_layernorm: (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                       layer.post_attention_layernorm: (layer.mlp.gate_proj, layer.mlp.up_proj)}
            for norm, linears in readers.items():
                for linear in linears:
                    linear.weight.mul_(norm.weight)
                norm.weight.fill_(1.0)
        model.lm_head.weight.mul_(model.norm.weight)
        model.norm.weight.fill_(1.0)


def install_online(model, transforms: Transforms) -> None:
    """Put the online face of T_k, T_v and T_u into the model's slots, leaving the weights as they are.

    The residual rotation and the down_proj Hadamard have no purely online face: both are only
    useful with their other half merged into the weights (see ``merge``).
    """
    for i, layer in enumerate(model.layers):
        if transforms.pre_rope is not None:
            layer.self_attn.qk_transform = transforms.pre_rope[i]
        if transforms.value is not None:
            layer.self_attn.value_transform = transforms.value[i]
            layer.self_attn.output_transform = transforms.value[i].undo
        if transforms.mlp_scale is not None:
            layer.mlp.up_transform = transforms.mlp_scale[i]
            layer.mlp.down_input_transform = transforms.mlp_scale[i].undo


def merge(model, transforms: Transforms) -> None:
    """Fold every mergeable transform into the weights of a norm-folded model, in place.

    Afterwards the model runs with plain weights plus the online parts (Hadamard, S_n), which
    ``model.config.fptquant`` names so that a saved checkpoint loads back with them.
    """
    with torch.no_grad():
        weights = transforms.merged_weights(dict(model.named_parameters()))
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    model.config.fptquant = transforms.online_parts()
    attach_online_parts(model, model.config.fptquant)
    model.embedding_transform = model.head_input_transform = None


def attach_online_parts(model, parts: dict) -> None:
    """Install the online parts that a merged checkpoint's config names (Hadamard, S_n)."""
    block = parts.get("down_proj_hadamard_block")
    for layer in model.layers:
        layer.mlp.down_input_transform = DownHadamard(model.config.intermediate_size) if block else None
        if block and layer.mlp.down_input_transform.block != block:
            raise ValueError(f"config names Hadamard block {block}, but this model's is "
                             f"{layer.mlp.down_input_transform.block}")
    model.dynamic_scaling = bool(parts.get("dynamic_scaling"))


# ----------------------------------------------------------------------------------------------
# The quantized model: quantizers in every slot, range calibration, training forward, export

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METHODS = {  # the transforms each method enables
    "rtn": (),
    "rotation": ("rotation", "hadamard"),
    "fptquant": TRANSFORM_NAMES,
}


def attach_quantizers(model, qconfig: QuantConfig) -> None:
    """Put a fake quantizer into every quantized slot, as the configuration's bit widths ask.

    Quantized: the weight of every block linear (symmetric, per output channel), the inputs of
    q/k/v (one shared quantizer), o_proj, gate/up (shared) and down_proj (asymmetric, per
    tensor, static), and the keys after RoPE and the values (static, per tensor). The embedding
    and the output head stay in floating point.
    """
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in BLOCK_LINEARS:
            linear = layer.get_submodule(name)
            linear.weight_quantizer = weight_quantizer(qconfig.weight_bits, linear.out_features)
        attn.input_quantizer = activation_quantizer(qconfig.act_bits)
        attn.o_input_quantizer = activation_quantizer(qconfig.act_bits)
        mlp.input_quantizer = activation_quantizer(qconfig.act_bits)
        mlp.down_input_quantizer = activation_quantizer(qconfig.act_bits)
        attn.key_quantizer = kv_quantizer(qconfig.kv_bits)
        attn.value_quantizer = kv_quantizer(qconfig.kv_bits)


def named_quantizers(model, weights: bool) -> dict[str, Quantizer]:
    """Return the weight quantizers (weights=True) or the activation and KV quantizers by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, Quantizer) and name.endswith("weight_quantizer") == weights}


class QuantizedModel(nn.Module):
    """A Llama with quantizers, trained through its transforms (norms folded when R is on).

    Before ``merge`` the forward computes every weight from the original weights and the current
    transform parameters (``Transforms.merged_weights``), so the weight quantizers and the
    activation quantizers see exactly the tensors of the merged model, and gradients reach the
    transform parameters. The original weights are frozen.
    """

    def __init__(self, teacher, qconfig: QuantConfig, enabled=TRANSFORM_NAMES, seed: int = 0):
        super().__init__()
        self.qconfig = qconfig
        self.model = copy.deepcopy(teacher)
        self.model.requires_grad_(False)
        self.transforms = Transforms(self.model.config, enabled, seed).to(next(teacher.parameters()).device)
        if self.transforms.rotation is not None:
            fold_norms(self.model)   # R commutes only with a bare norm; folding changes the weights RTN quantizes
        attach_online_parts(self.model, self.transforms.online_parts())
        attach_quantizers(self.model, qconfig)
        if self.transforms.rotation is not None:
            # The embedding and the head are not quantized, so R can stay online until the merge.
            self.model.embedding_transform = self.transforms.rotation.rotate
            self.model.head_input_transform = self.transforms.rotation.unrotate
        self.merged = False

    def weights(self) -> dict[str, torch.Tensor]:
        """Return the block weights with the current transforms merged (R is applied online, see __init__)."""
        base = {name: param for name, param in self.model.named_parameters() if "quantizer" not in name}
        return self.transforms.merged_weights(base, embedding_and_head=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.model(tokens)
        # Compute each orthogonal matrix once per forward, not at every use.
        with parametrize.cached():
            return torch.func.functional_call(self.model, self.weights(), (tokens,))

    @torch.no_grad()
    def init_weight_ranges(self, method: str = "search", p: float = 2.4) -> None:
        weights = self.model.state_dict() if self.merged else self.weights()
        for name, quantizer in named_quantizers(self.model, weights=True).items():
            quantizer.init_from_tensor(weights[name.removesuffix("weight_quantizer") + "weight"], method, p)

    @torch.no_grad()
    def calibrate(self, batches: torch.Tensor, method: str = "search", p: float = 2.4,
                  progress=None) -> None:
        """Initialise every range: weights from the weights, activations and KV from ``batches``."""
        self.init_weight_ranges(method, p)
        quantizers = named_quantizers(self.model, weights=False).values()
        for quantizer in quantizers:
            quantizer.reset_observations()
            quantizer.observing = True
        for i, batch in enumerate(batches):
            self(batch[None])
            if progress is not None:
                progress.update(i + 1)
        for quantizer in quantizers:
            quantizer.observing = False
            quantizer.init_range(method, p)

    def merge(self) -> None:
        """Fold the trained transforms into the weights; the forward then runs the plain slots."""
        merge(self.model, self.transforms)
        self.model.config.fptquant["quantization"] = {"config": self.qconfig.name, "file": QUANTIZED_FILE}
        self.merged = True


QUANTIZED_FILE = "quantized.safetensors"


@torch.no_grad()
def export_quantized(model) -> dict[str, torch.Tensor]:
    """Return the integer weights, weight scales and static activation/KV ranges of a merged model.

    Names: ``<linear>.weight_int`` (int8 values on the signed grid) and ``<linear>.weight_scale``
    (out, 1); ``<quantizer>.scale`` and ``<quantizer>.zero_point`` for activations and KV.
    """
    tensors = {}
    for name, quantizer in named_quantizers(model, weights=True).items():
        linear = name.removesuffix(".weight_quantizer")
        codes, scale, _ = quantizer.quantize_to_int(model.get_submodule(linear).weight)
        tensors[f"{linear}.weight_int"] = codes.cpu().contiguous()
        tensors[f"{linear}.weight_scale"] = scale.float().cpu().contiguous()
    for name, quantizer in named_quantizers(model, weights=False).items():
        tensors[f"{name}.scale"] = quantizer.scale.detach().float().cpu().reshape(())
        tensors[f"{name}.zero_point"] = quantizer.zero_point.detach().round().float().cpu().reshape(())
    return tensors


def load_quantizers(model, folder) -> QuantConfig:
    """Attach the fake quantizers that a merged checkpoint's quantized export describes."""
    from safetensors.torch import load_file

    info = model.config.fptquant["quantization"]
    qconfig = QuantConfig.from_name(info["config"])
    attach_quantizers(model, qconfig)
    tensors = load_file(str(Path(folder) / info["file"]))
    with torch.no_grad():
        for name, quantizer in named_quantizers(model, weights=True).items():
            scale = tensors[name.removesuffix(".weight_quantizer") + ".weight_scale"]
            quantizer.scale.copy_(scale.reshape(quantizer.scale.shape))
            quantizer.initialized = True
        for name, quantizer in named_quantizers(model, weights=False).items():
            quantizer.scale.copy_(tensors[f"{name}.scale"])
            quantizer.zero_point.copy_(tensors[f"{name}.zero_point"])
            quantizer.initialized = True
    return qconfig
