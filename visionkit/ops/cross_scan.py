"""The four-direction 2D scan of VMamba's SS2D: unfold a feature map into 4 sequences and fold them back.

VMamba (Liu et al., "VMamba: Visual State Space Model", arXiv 2401.10166; ``MzeroMiko/VMamba`` ``cross_scan_fwd`` /
``cross_merge_fwd`` with ``scans=0``) reads a ``(B, C, H, W)`` map as four sequences of length ``L = H·W``, in this
order:

    0. row-major (``x[h, w]`` at position ``h·W + w``),
    1. column-major (``x[h, w]`` at position ``w·H + h``),
    2. row-major reversed,
    3. column-major reversed.

:func:`cross_merge` maps four sequences back to the raster (row-major) order and sums them. It is the adjoint of
:func:`cross_scan`: ``<cross_scan(x), y> == <x, cross_merge(y)>`` for every ``x`` and ``y``, so each is the other's
gradient, and ``cross_merge(cross_scan(x)) == 4·x``. Both are plain differentiable PyTorch (flips, transposes and
reshapes), so autograd handles them with no custom backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CROSS_SCAN_DIRECTIONS", "cross_merge", "cross_scan"]

#: Number of scan directions (the ``K`` of VMamba's ``k_group``).
CROSS_SCAN_DIRECTIONS = 4


def cross_scan(x: Tensor) -> Tensor:
    """Unfold a feature map into its four scan sequences.

    Args:
        x: Feature map, ``(B, C, H, W)``.

    Returns:
        ``(B, 4, C, H·W)``: row-major, column-major, reversed row-major, reversed column-major.

    Raises:
        ValueError: ``x`` is not 4-D.
    """
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects a (B, C, H, W) map, got {x.dim()}-D shape {tuple(x.shape)}")
    row_major = x.flatten(2)
    col_major = x.transpose(2, 3).flatten(2)
    forward = torch.stack([row_major, col_major], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: Tensor) -> Tensor:
    """Fold four scan sequences back to raster order and sum them (the adjoint of :func:`cross_scan`).

    Args:
        y: Four sequences laid out on the grid they came from, ``(B, 4, C, H, W)``: ``y[:, k, :, i, j]`` is position
            ``i·W + j`` of sequence ``k`` (the ``(B, 4, C, H·W)`` scan output viewed as ``(B, 4, C, H, W)``).

    Returns:
        ``(B, C, H·W)`` in row-major order.

    Raises:
        ValueError: ``y`` is not ``(B, 4, C, H, W)``.
    """
    if y.dim() != 5 or y.shape[1] != CROSS_SCAN_DIRECTIONS:
        raise ValueError(f"cross_merge expects (B, 4, C, H, W) sequences, got shape {tuple(y.shape)}")
    batch, _, channels, height, width = y.shape
    seqs = y.flatten(3)  # (B, 4, C, L), position = sequence index
    # Undo the reversal of sequences 2 and 3, then sum each with its forward twin.
    pairs = seqs[:, 0:2] + seqs[:, 2:4].flip(-1)
    # Sequence 1 is column-major: position w·H + h holds pixel (h, w).
    col_major = pairs[:, 1].reshape(batch, channels, width, height).transpose(2, 3).flatten(2)
    return pairs[:, 0] + col_major
