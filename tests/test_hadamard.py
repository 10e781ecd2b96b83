"""Hadamard matrices (Sylvester x Paley), the residual rotation init and the grouped Walsh-Hadamard."""

import logging
import math

import pytest
import torch

from fptquant import (grouped_walsh_hadamard, hadamard_matrix, largest_power_of_two_divisor,
                      paley_matrix, random_orthogonal, residual_rotation_init)


def assert_normalised_hadamard(H: torch.Tensor, n: int) -> None:
    assert H.shape == (n, n)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(H.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64),
                               rtol=0, atol=1e-15)


# 576 = 16 * 36 (Paley II, q = 17); 12 and 20 are Paley I (q = 11, 19); 28 is Paley II (q = 13);
# 768 = 64 * 12 and 1536 = 128 * 12; 64, 2048 and 4096 are Sylvester alone.
@pytest.mark.parametrize("n", [576, 12, 20, 28, 36, 64, 768, 1536, 2048, 4096])
def test_hadamard_matrix_is_orthogonal(n):
    assert_normalised_hadamard(hadamard_matrix(n), n)


# Paley I, m = q + 1 with a prime q = 3 mod 4: q = 11, 19, 23, 31.
@pytest.mark.parametrize("m", [12, 20, 24, 32])
def test_paley_one_orders(m):
    H = paley_matrix(m)
    torch.testing.assert_close(H @ H.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


# Paley II, m = 2 (q + 1) with a prime q = 1 mod 4: q = 13, 17, 37, 61. None of these m has a
# Paley I construction as well, because m - 1 = 27, 35, 75, 123 is not prime.
@pytest.mark.parametrize("m", [28, 36, 76, 124])
def test_paley_two_orders(m):
    H = paley_matrix(m)
    torch.testing.assert_close(H @ H.T, m * torch.eye(m, dtype=torch.float64), rtol=0, atol=0)


def test_hadamard_matrix_small_orders():
    assert torch.equal(hadamard_matrix(1), torch.ones(1, 1, dtype=torch.float64))
    expected = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    torch.testing.assert_close(hadamard_matrix(2), expected, rtol=0, atol=1e-15)


# 3, 6 and 22 are neither 1, 2 nor multiples of 4, so no Hadamard matrix exists. A matrix of
# order 92 exists (a Williamson matrix), but 92 = 4 * 23 has no Paley factor m in 23, 46, 92,
# because none of m - 1 = 22, 45, 91 and m / 2 - 1 = 22, 45 is prime.
@pytest.mark.parametrize("n", [3, 6, 22, 92])
def test_hadamard_matrix_none_without_construction(n):
    assert hadamard_matrix(n) is None


def test_hadamard_matrix_rejects_nonpositive_order():
    with pytest.raises(ValueError, match="got 0"):
        hadamard_matrix(0)


def test_random_orthogonal_is_orthogonal_and_seeded():
    first = random_orthogonal(50, torch.Generator().manual_seed(3))
    second = random_orthogonal(50, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    torch.testing.assert_close(first @ first.T, torch.eye(50, dtype=torch.float64), rtol=0, atol=1e-12)


def test_residual_rotation_prefers_hadamard(caplog):
    with caplog.at_level(logging.WARNING, logger="fptquant"):
        matrix, description = residual_rotation_init(576, torch.Generator().manual_seed(0))
    assert description == "hadamard"
    assert_normalised_hadamard(matrix, 576)
    assert caplog.records == []


def test_residual_rotation_falls_back_with_log(caplog):
    with caplog.at_level(logging.WARNING, logger="fptquant"):
        matrix, description = residual_rotation_init(92, torch.Generator().manual_seed(0))
    assert description == "random orthogonal"
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(92, dtype=torch.float64), rtol=0, atol=1e-12)
    assert len(caplog.records) == 1
    assert "92" in caplog.records[0].getMessage()


@pytest.mark.parametrize("n, expected", [(1536, 512), (11008, 256), (14336, 2048), (576, 64), (7, 1), (4096, 4096)])
def test_largest_power_of_two_divisor(n, expected):
    assert largest_power_of_two_divisor(n) == expected


def test_largest_power_of_two_divisor_rejects_zero():
    with pytest.raises(ValueError, match="got 0"):
        largest_power_of_two_divisor(0)


@pytest.mark.parametrize("block, width", [(4, 24), (8, 24), (512, 1536)])
def test_grouped_walsh_hadamard_equals_block_diagonal(block, width):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=generator, dtype=torch.float64)
    H = hadamard_matrix(block)
    expected = x @ torch.block_diag(*[H] * (width // block))
    torch.testing.assert_close(grouped_walsh_hadamard(x, block), expected, rtol=0, atol=1e-12)


def test_grouped_walsh_hadamard_is_not_ungrouped():
    # Block 4 must mix channels only within each group of 4.
    x = torch.zeros(1, 8, dtype=torch.float64)
    x[0, 0] = 1.0
    out = grouped_walsh_hadamard(x, 4)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0]], dtype=torch.float64))


def test_grouped_walsh_hadamard_twice_is_identity():
    x = torch.randn(4, 5, 1536, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(grouped_walsh_hadamard(grouped_walsh_hadamard(x, 512), 512), x,
                               rtol=0, atol=1e-5)


def test_grouped_walsh_hadamard_merges_into_linear():
    # y = x W^T = (x H)(W H)^T because H H^T = I.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    W = torch.randn(10, 64, generator=generator, dtype=torch.float64)
    merged = grouped_walsh_hadamard(W, 16)
    torch.testing.assert_close(grouped_walsh_hadamard(x, 16) @ merged.T, x @ W.T, rtol=0, atol=1e-12)


def test_grouped_walsh_hadamard_gradient():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 32, generator=generator, dtype=torch.float64)
    (grouped_walsh_hadamard(x, 8) * upstream).sum().backward()
    blocks = torch.block_diag(*[hadamard_matrix(8)] * 4)
    torch.testing.assert_close(x.grad, upstream @ blocks.T, rtol=0, atol=1e-12)


def test_grouped_walsh_hadamard_keeps_low_precision_dtype():
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    expected = grouped_walsh_hadamard(x, 64)
    for dtype in (torch.float32, torch.bfloat16):
        out = grouped_walsh_hadamard(x.to(dtype), 64)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("block, width, message", [(6, 12, "power of two"), (0, 12, "power of two"),
                                                   (8, 12, "not a multiple")])
def test_grouped_walsh_hadamard_rejects_bad_block(block, width, message):
    with pytest.raises(ValueError, match=message):
        grouped_walsh_hadamard(torch.zeros(2, width), block)
