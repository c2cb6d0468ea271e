"""Tests of visionkit.ops.cross_scan: the 4-direction scan order, its adjoint merge, round trip and gradients."""

from __future__ import annotations

import pytest
import torch

from visionkit.ops.cross_scan import cross_merge, cross_scan


def test_cross_scan_hand_checked_2x3():
    # x = [[0, 1, 2],
    #      [3, 4, 5]]
    x = torch.arange(6.0).view(1, 1, 2, 3)
    seqs = cross_scan(x)
    assert seqs.shape == (1, 4, 1, 6)
    assert seqs[0, :, 0].tolist() == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major
        [5, 4, 3, 2, 1, 0],  # row-major reversed
        [5, 2, 4, 1, 3, 0],  # column-major reversed
    ]


def test_cross_merge_hand_checked_2x3():
    # Sequence k carries 10^k at its position p; each position maps back to one pixel per direction.
    seqs = torch.zeros(1, 4, 1, 6)
    seqs[0, 1, 0, 1] = 1.0  # column-major position 1 = pixel (1, 0) = raster 3
    seqs[0, 2, 0, 0] = 10.0  # reversed row-major position 0 = pixel (1, 2) = raster 5
    seqs[0, 3, 0, 4] = 100.0  # reversed column-major position 4 = column-major 1 = raster 3
    seqs[0, 0, 0, 2] = 1000.0  # row-major position 2 = raster 2
    merged = cross_merge(seqs.view(1, 4, 1, 2, 3))
    assert merged.shape == (1, 1, 6)
    assert merged[0, 0].tolist() == [0, 0, 1000, 101, 0, 10]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 7), (3, 1, 6, 1), (1, 4, 3, 3)])
def test_merge_of_scan_is_four_times_x(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    batch, channels, height, width = shape
    merged = cross_merge(cross_scan(x).view(batch, 4, channels, height, width))
    torch.testing.assert_close(merged, 4 * x.flatten(2), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 5, 2)])
def test_merge_is_the_adjoint_of_scan(shape):
    gen = torch.Generator().manual_seed(0)
    batch, channels, height, width = shape
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    y = torch.randn(batch, 4, channels, height * width, dtype=torch.float64, generator=gen)
    lhs = (cross_scan(x) * y).sum()
    rhs = (x.flatten(2) * cross_merge(y.view(batch, 4, channels, height, width))).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_gradients_are_each_others_map():
    # The gradient of <cross_scan(x), y> w.r.t. x is cross_merge(y), and vice versa.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(2, 4, 3, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    (grad_x,) = torch.autograd.grad((cross_scan(x) * y.detach().flatten(3)).sum(), x)
    torch.testing.assert_close(grad_x.flatten(2), cross_merge(y.detach()))
    (grad_y,) = torch.autograd.grad((cross_merge(y) * x.detach().flatten(2)).sum(), y)
    torch.testing.assert_close(grad_y.flatten(3), cross_scan(x.detach()))
    assert torch.autograd.gradcheck(cross_scan, (x.detach().requires_grad_(),))
    assert torch.autograd.gradcheck(cross_merge, (y.detach().requires_grad_(),))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"cross_scan expects a \(B, C, H, W\) map"):
        cross_scan(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"cross_merge expects \(B, 4, C, H, W\)"):
        cross_merge(torch.zeros(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"cross_merge expects \(B, 4, C, H, W\)"):
        cross_merge(torch.zeros(2, 4, 1, 4))
