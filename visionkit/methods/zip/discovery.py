"""Zip's instance discovery on the cluster grid: fragments, their selection, connected components and boxes.

Reproduces the released ``zip_utils.py`` (``ChengShiest/Zip-Your-CLIP`` at ``c54c646``; ``docs/methods/zip.md``
§5) without its per-cluster and per-fragment loops over full-size masks:

1. The clusters examined are the ``top_k`` (20) most frequent labels of the activation-masked cluster map
   (``(cluster + 1) · active``), counted as ``collections.Counter(...).most_common(top_k)`` counts them: ties keep the
   order in which the labels first appear in a raster scan. "Outside the activation" (label 0) is one of the labels
   and is then skipped, so at most ``top_k`` and usually ``top_k - 1`` clusters are examined. A cluster with no
   activated cell is never examined.
2. Each examined cluster is split into 4-connected fragments over the whole grid (``skimage.measure.label(cluster ==
   c, connectivity=1)``). A fragment is kept iff ``gain = |fragment ∩ active| / |fragment| > gain_thresh`` (0.3) and
   ``compactness = bbox_area / area < compact_thresh`` (3); both ratios are computed in float64 from integer counts,
   as released.
3. The union of the kept fragments is split into 4-connected components; components of at least ``min_area`` (100)
   cells become boxes, in the order skimage numbers them (raster order of their first cell).

Here every examined cluster's fragments are labelled at once (components of the grid graph whose edges join
4-neighbours of the same cluster), and areas, activated counts and bounding boxes of all fragments come from one
``bincount`` / ``ufunc.at`` each. Labelling is a vectorised union-find (row runs joined up front, then min-hooking
plus pointer jumping over the vertical edges) whose roots are the regions' first raster cells, so the numbering is
skimage's. The maps are small (~128×170 cells), so the work is done in numpy on the CPU: single-threaded, it does not
pay torch's intra-op thread start-up on tensors of this size; inputs on another device are copied over and results
copied back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from visionkit.ops.connected_components import label_regions, region_props_array

__all__ = ["discover_instances", "grid_boxes_to_image", "select_fragments"]


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _examined_clusters(masked: np.ndarray, top_k: int) -> np.ndarray:
    """Released ``Counter(masked.flatten()).most_common(top_k)`` without label 0 (ties: first occurrence first)."""
    flat = masked.ravel()
    labels, first, counts = np.unique(flat, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # count descending, then raster order of the first occurrence
    top = labels[order[:top_k]]
    return top[top != 0]


def select_fragments(
    clusters: Tensor,
    active: Tensor,
    gain_thresh: float = 0.3,
    compact_thresh: float = 3.0,
    top_k: int = 20,
) -> Tensor:
    """Keep the activated, compact cluster fragments of one class (released Zip rule, see the module docstring).

    Args:
        clusters: ``(h, w)`` integer cluster map, labels ``0..k-1`` (:func:`~visionkit.methods.zip.kmeans` output).
        active: ``(h, w)`` bool class activation mask on the same grid (the activation map resized to the grid with
            nearest interpolation and thresholded).
        gain_thresh: A fragment needs ``activated cells / cells > gain_thresh`` (Zip: 0.3).
        compact_thresh: A fragment needs ``bbox area / cells < compact_thresh`` (Zip: 3).
        top_k: Number of most frequent labels of the masked cluster map examined, "outside" included (Zip: 20).

    Returns:
        ``(h, w)`` bool on ``clusters``' device: the union of the kept fragments. Computed on the CPU.

    Raises:
        ValueError: Shapes differ or are not 2-D, ``clusters`` is not a non-negative integer map, or ``active`` is
            not bool.
    """
    if clusters.ndim != 2 or clusters.shape != active.shape:
        raise ValueError(
            f"clusters and active must be 2-D maps of the same shape, got {tuple(clusters.shape)} and "
            f"{tuple(active.shape)}"
        )
    if clusters.is_floating_point() or clusters.is_complex() or clusters.dtype == torch.bool:
        raise ValueError(f"clusters must be an integer label map, got {clusters.dtype}")
    if active.dtype != torch.bool:
        raise ValueError(f"active must be a bool mask, got {active.dtype}")
    ids = _to_numpy(clusters).astype(np.int64) + 1  # the released code's labels 1..k
    act = _to_numpy(active)
    if ids.size and ids.min() < 1:
        raise ValueError("clusters must hold labels >= 0")

    examined = np.zeros(int(ids.max(initial=0)) + 1, dtype=bool)
    examined[_examined_clusters(ids * act, top_k)] = True
    fragments = label_regions(ids, examined[ids])
    area, boxes = region_props_array(fragments)
    inside = np.bincount(fragments[act], minlength=area.size + 1)[1:]
    box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # float64 ratios of integer counts, compared as released (np.float64 > 0.3, int / int < 3)
    ok = (inside / area > gain_thresh) & (box_area / area < compact_thresh)
    keep = np.concatenate([[False], ok])  # label 0: not an examined fragment
    return torch.from_numpy(keep[fragments]).to(clusters.device)


def discover_instances(kept: Tensor, min_area: int = 100) -> Tensor:
    """Boxes of the 4-connected components of ``kept`` with at least ``min_area`` cells.

    Args:
        kept: ``(h, w)`` bool mask (:func:`select_fragments` output).
        min_area: Minimum component size in cells (Zip: 100, i.e. components of 99 cells or fewer are dropped).

    Returns:
        ``(K, 4)`` float32 boxes xyxy in grid cells, ``x2`` / ``y2`` exclusive, in skimage's component order (raster
        order of the first cell), on ``kept``'s device.

    Raises:
        ValueError: ``kept`` is not 2-D.
    """
    if kept.ndim != 2:
        raise ValueError(f"discover_instances expects a 2-D mask, got shape {tuple(kept.shape)}")
    fg = _to_numpy(kept) != 0
    area, boxes = region_props_array(label_regions(fg.view(np.uint8), fg))
    return torch.from_numpy(boxes[area >= min_area].astype(np.float32)).to(kept.device)


def grid_boxes_to_image(
    boxes: Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int], released_quirk: bool = False
) -> Tensor:
    """Map grid-cell boxes to image pixels.

    The released ``resize_pos`` scales x by ``image_h / grid_h`` and y by ``image_w / grid_w`` (it reads ``(h, w)``
    as ``(w, h)``); the two factors agree only when the grid keeps the image's aspect ratio exactly. For the 2048
    short-side input and stride 16 they differ slightly (640×480 → grid 128×170: 3.750 vs 3.765), which shrinks x.
    By default this function scales each axis by its own factor (x by ``image_w / grid_w``, y by
    ``image_h / grid_h``); ``released_quirk=True`` reproduces ``resize_pos``.

    Args:
        boxes: ``(K, 4)`` xyxy in grid cells (:func:`discover_instances` output).
        grid_hw: ``(grid_h, grid_w)``.
        image_hw: ``(image_h, image_w)`` in pixels.
        released_quirk: Use the released swapped factors.

    Returns:
        ``(K, 4)`` float32 xyxy boxes in image pixels.
    """
    (gh, gw), (ih, iw) = grid_hw, image_hw
    sx, sy = (ih / gh, iw / gw) if released_quirk else (iw / gw, ih / gh)
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float64, device=boxes.device)
    return (boxes.double() * scale).float()
