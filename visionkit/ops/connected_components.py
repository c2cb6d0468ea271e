"""Connected components of binary masks and of equal-value regions, numbered as ``skimage.measure.label`` numbers them.

Labelling is a vectorised union-find: row runs are joined up front, then min-hooking plus pointer jumping over the
vertical (and, for 8-connectivity, diagonal) edges; the roots are the regions' first raster cells, so the numbering is
skimage's (components ``1..R`` in raster order of their first cell). The work is done in numpy on the CPU: for the
small maps this serves (Zip's ~128×170 cluster grids) it is steadier than torch's multi-threaded small-tensor ops;
torch inputs on another device are copied over and the results copied back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["connected_components", "label_regions", "region_props", "region_props_array"]


# Offsets (drow, dcol) to the neighbours in the next row; the left/right neighbours are handled as row runs.
_OFFSETS = {4: ((1, 0),), 8: ((1, 0), (1, 1), (1, -1))}


def _next_row_edges(h: int, w: int, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat index pairs ``(a, b)``, ``a < b``, of every cell and its neighbours in the next row."""
    idx = np.arange(h * w).reshape(h, w)
    src, dst = [], []
    for dr, dc in _OFFSETS[connectivity]:
        c0, c1 = max(0, -dc), w - max(0, dc)
        src.append(idx[: h - dr, c0:c1].ravel())
        dst.append(idx[dr:, c0 + dc : c1 + dc].ravel())
    return np.concatenate(src), np.concatenate(dst)


def label_regions(values: np.ndarray, fg: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Label connected regions of equal ``values`` among the ``fg`` cells.

    Args:
        values: ``(h, w)`` integer map; neighbours join only if their values are equal.
        fg: ``(h, w)`` bool, the cells to label.
        connectivity: 4 or 8.

    Returns:
        ``(h, w)`` int64: 0 outside ``fg``, regions numbered ``1..R`` in raster order of their first cell (the order
        ``skimage.measure.label`` gives).
    """
    h, w = values.shape
    n = h * w
    idx = np.arange(n)
    # Each run of equal fg cells in a row starts joined: every cell points at the run's first cell.
    joins_left = np.zeros((h, w), dtype=bool)
    joins_left[:, 1:] = fg[:, 1:] & fg[:, :-1] & (values[:, 1:] == values[:, :-1])
    parent = np.maximum.accumulate(np.where(joins_left, 0, idx.reshape(h, w)), axis=1).ravel()
    flat, fg_flat = values.ravel(), fg.ravel()
    a, b = _next_row_edges(h, w, connectivity)
    same = fg_flat[a] & fg_flat[b] & (flat[a] == flat[b])
    a, b = a[same], b[same]
    # Invariant: parent[i] <= i and parent[i] lies in i's region, so every root is its region's first raster cell.
    while a.size:
        pa, pb = parent[a], parent[b]
        open_ = pa != pb  # an edge whose ends share a root stays merged: drop it
        a, b, pa, pb = a[open_], b[open_], pa[open_], pb[open_]
        if not a.size:
            break
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))  # hook the larger root under the smaller
        while True:  # pointer jumping until every cell points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    is_root = fg_flat & (parent == idx)
    number = np.cumsum(is_root)
    return np.where(fg_flat, number[parent], 0).reshape(h, w)


def region_props_array(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area ``(R,)`` and xyxy boxes ``(R, 4)`` (exclusive ``x2`` / ``y2``) of labels ``1..R``; absent labels: zeros."""
    h, w = labels.shape
    flat = labels.ravel()
    r = int(flat.max()) if flat.size else 0
    area = np.bincount(flat, minlength=r + 1)
    rows, cols = np.divmod(np.arange(h * w), w)
    lo = np.full((2, r + 1), h * w, dtype=np.int64)
    hi = np.full((2, r + 1), -1, dtype=np.int64)
    for i, v in enumerate((cols, rows)):
        np.minimum.at(lo[i], flat, v)
        np.maximum.at(hi[i], flat, v)
    boxes = np.concatenate([lo, hi + 1]).T[1:]
    boxes[area[1:] == 0] = 0
    return area[1:], boxes


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in _OFFSETS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def connected_components(mask: Tensor | np.ndarray, connectivity: int = 4) -> Tensor | np.ndarray:
    """Label the connected components of a binary mask.

    Same partition and numbering as ``skimage.measure.label(mask, connectivity=1 or 2, background=0)`` on a binary
    mask: components ``1..R`` in raster order of their first cell, 0 = background.

    Args:
        mask: ``(h, w)`` mask; nonzero / True cells are foreground. A torch tensor (computed on the CPU, returned on
            its device) or a numpy array.
        connectivity: 4 (edge neighbours; skimage ``connectivity=1``) or 8 (edges and corners; ``connectivity=2``).

    Returns:
        ``(h, w)`` int64 labels, a torch tensor on ``mask``'s device, or a numpy array for a numpy ``mask``.

    Raises:
        ValueError: ``mask`` is not 2-D or ``connectivity`` is not 4 or 8.
    """
    _check_connectivity(connectivity)
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D mask, got shape {tuple(mask.shape)}")
    fg = _to_numpy(mask) != 0
    labels = label_regions(fg.view(np.uint8), fg, connectivity)
    return labels if isinstance(mask, np.ndarray) else torch.from_numpy(labels).to(mask.device)


def region_props(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Area and bounding box of every label ``1..R`` of a label map.

    Args:
        labels: ``(h, w)`` integer labels, 0 = background, ``1..R`` used (``R`` = the maximum).

    Returns:
        ``(area, boxes)`` on ``labels``' device: area ``(R,)`` int64 in cells; boxes ``(R, 4)`` int64 xyxy in cells
        with ``x2`` / ``y2`` exclusive (skimage's ``bbox`` ``(min_row, min_col, max_row, max_col)`` reordered to
        xyxy), all zero for a label that does not occur. Index ``i`` is label ``i + 1``.
    """
    area, boxes = region_props_array(_to_numpy(labels).astype(np.int64, copy=False))
    return torch.from_numpy(area).to(labels.device), torch.from_numpy(boxes).to(labels.device)
