"""K-means as Zip's released code runs it (its boundary prior over dense CLIP-ResNet features), vectorised.

The released ``zip_utils.py`` (``ChengShiest/Zip-Your-CLIP`` at ``c54c646``; ``docs/methods/zip.md`` §4) clusters
the ``(h·w, 2048)`` RN50x64 layer3 features with a hand-written loop:

* initial centroids: the feature rows at ``round(linspace(0, h·w − 1, k))`` (float32 ``linspace``, round half to even,
  then ``unique``), i.e. evenly spaced raster positions;
* up to 100 iterations of: assign every row to the nearest centroid by ``torch.cdist(x, c).argmin(1)`` (ties go to
  the lowest index); replace each centroid by the mean of its rows, an empty cluster keeping its old centroid; stop
  after the update when ``torch.allclose(new, old, rtol=1e-5)`` (default ``atol=1e-8``);
* labels = the last assignment (made with the centroids *before* the last update), numbered 1..k.

:func:`kmeans` reproduces that loop with two changes; the first leaves every bit as it was, the second changes the
centroids only at float32 rounding level:

* The distances are exactly what ``torch.cdist`` computes for more than 25 rows (its matrix-multiply path,
  ``[-2x, ‖x‖², 1] @ [c, 1, ‖c‖²]ᵀ``, clamped at 0, square root), so the assignments are bit-identical for the same
  centroids; but the ``(N, D + 2)`` left factor is built once instead of in every iteration, so an iteration costs one
  ``(N, D + 2) × (D + 2, k)`` GEMM.
* The centroid update is incremental and vectorised: per-cluster sums are kept in float64 and only the rows whose
  label changed are added to their new cluster and subtracted from their old one (``index_add_`` over chunks of rows;
  the first iteration adds every row), instead of a Python loop over clusters. The means are the float64 means
  rounded once to float32, within float32 rounding (~1e-7 relative) of the released float32 means; when no label
  changes they are bit-identical to the previous iteration's, so the stop rule fires when the released one does. A
  rounding difference can flip a label only at an exact near-tie; none occurred in the tests (random blobs, every
  iteration cap) or in ``bench/zip.py`` (128×170×2048, 85 iterations: identical labels).

Labels are returned as ``0..k-1`` (what :func:`~visionkit.methods.zip.discovery.select_fragments` takes); the released
code adds 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans", "raster_init_indices"]

# torch.cdist switches to the matrix-multiply distance when either side has more than 25 rows
# (aten/src/ATen/native/Distance.cpp, cdist_impl with compute_mode "use_mm_for_euclid_dist_if_necessary").
_CDIST_MM_MIN_ROWS = 25
# Rows converted to float64 at a time in the centroid update (a 16 MiB temporary at D = 2048).
_UPDATE_CHUNK = 1024


def raster_init_indices(num_points: int, k: int) -> Tensor:
    """The released code's initial centroid rows: ``unique(round(linspace(0, num_points - 1, k)))``.

    Args:
        num_points: Number of points ``N`` (``h·w`` for a feature grid read in raster order).
        k: Number of clusters.

    Returns:
        ``(k',)`` int64 row indices, increasing; ``k' == k`` whenever ``num_points >= k``.
    """
    # float32 linspace as in zip_utils.py (torch's default dtype); torch.round rounds half to even.
    idx = torch.linspace(0, num_points - 1, k, dtype=torch.float32)
    return torch.unique(torch.round(idx)).long()


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    if x.ndim == 2:
        return x, None
    if x.ndim == 3:  # (D, h, w) -> (h·w, D) in raster order, as zip_utils.py flattens the feature map
        d, h, w = x.shape
        return x.permute(1, 2, 0).reshape(h * w, d), (h, w)
    raise ValueError(f"kmeans expects x of shape (N, D) or (D, h, w), got {tuple(x.shape)}")


class _Distances:
    """``torch.cdist(x, c)`` for a fixed ``x`` and changing ``c``, bit-identical, with ``x``'s factor built once."""

    def __init__(self, x: Tensor, k: int) -> None:
        self.x = x
        self.use_mm = x.shape[0] > _CDIST_MM_MIN_ROWS or k > _CDIST_MM_MIN_ROWS
        if self.use_mm:
            norm = x.pow(2).sum(-1, keepdim=True)
            self.x_aug = torch.cat([x.mul(-2), norm, torch.ones_like(norm)], -1)

    def __call__(self, c: Tensor) -> Tensor:
        if not self.use_mm:
            return torch.cdist(self.x, c, p=2)
        norm = c.pow(2).sum(-1, keepdim=True)
        c_aug = torch.cat([c, torch.ones_like(norm), norm], -1)
        return self.x_aug.matmul(c_aug.mT).clamp_min_(0).sqrt_()


def _accumulate(sums: Tensor, x: Tensor, rows: Tensor | None, new: Tensor, old: Tensor | None) -> None:
    """``sums[new[r]] += x[r]``, ``sums[old[r]] -= x[r]`` in float64 for each row ``r`` (all rows if ``rows`` is None).

    Rows go through float64 in chunks of ``_UPDATE_CHUNK`` so the temporary stays small.
    """
    total = x.shape[0] if rows is None else rows.numel()
    for start in range(0, total, _UPDATE_CHUNK):
        r = slice(start, start + _UPDATE_CHUNK) if rows is None else rows[start : start + _UPDATE_CHUNK]
        vals = x[r].to(torch.float64)
        sums.index_add_(0, new[r], vals)
        if old is not None:
            sums.index_add_(0, old[r], vals, alpha=-1)


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int = 20,
    iters: int = 100,
    rtol: float = 1e-5,
    init: str = "raster",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means with the released Zip code's initialisation, stopping rule and empty-cluster rule.

    Args:
        x: Features, ``(N, D)``, or a feature map ``(D, h, w)`` that is read in raster order (row ``i·w + j`` is
            pixel ``(i, j)``, as ``zip_utils.py`` flattens it). Floating point; half precision is computed in
            float32. Un-normalised (Zip clusters raw features).
        k: Number of clusters (Zip: 20).
        iters: Maximum number of assignment/update iterations (Zip: 100).
        rtol: Relative tolerance of the stop test ``torch.allclose(new, old, rtol=rtol)`` (``atol`` stays at torch's
            default 1e-8, as released).
        init: ``"raster"`` (released ``zip_utils.py``: rows :func:`raster_init_indices`) or ``"random"`` (released
            ``demo.ipynb``: ``k`` rows drawn uniformly *with replacement* by ``torch.randint``; a repeated row gives
            duplicate centroids, of which all but the lowest-numbered stay empty, as in the notebook).
        generator: Required for ``init="random"``: the seeded ``torch.Generator`` that draws the rows (the notebook's
            draw is unseeded). Ignored for ``"raster"``.

    Returns:
        ``(labels, centroids)``: labels ``(N,)`` (or ``(h, w)`` for a 3-D ``x``) int64 in ``0..k-1`` (the released
        code's labels minus 1); centroids ``(k, D)`` in ``x``'s dtype (float32 for half input), after the last
        update. The labels are the last assignment, made with the centroids before that update, as released.

    Raises:
        ValueError: Bad shape, non-floating ``x``, ``k < 1``, fewer points than clusters (the released loop fails
            there with an index error), unknown ``init`` or ``init="random"`` without a generator.
    """
    flat, grid = _flatten(x)
    if not flat.is_floating_point():
        raise ValueError(f"kmeans expects floating-point features, got {flat.dtype}")
    if k < 1 or iters < 1:
        raise ValueError(f"kmeans needs k >= 1 and iters >= 1, got k={k}, iters={iters}")
    n = flat.shape[0]
    if n < k:
        raise ValueError(f"kmeans needs at least k={k} points, got {n}")
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    flat = flat.contiguous()

    if init == "raster":
        idx = raster_init_indices(n, k)
    elif init == "random":
        if generator is None:
            raise ValueError('kmeans(init="random") needs an explicit torch.Generator (seeded) for reproducibility')
        idx = torch.randint(n, (k,), generator=generator, device=generator.device)
    else:
        raise ValueError(f'unknown kmeans init {init!r}; expected "raster" or "random"')
    centroids = flat[idx.to(flat.device)]

    distances = _Distances(flat, k)
    labels = distances(centroids).argmin(1)
    sums = torch.zeros(k, flat.shape[1], dtype=torch.float64, device=flat.device)
    _accumulate(sums, flat, None, labels, None)
    counts = torch.bincount(labels, minlength=k)
    for it in range(iters):
        if it > 0:
            new_labels = distances(centroids).argmin(1)
            moved = (new_labels != labels).nonzero().squeeze(1)
            _accumulate(sums, flat, moved, new_labels, labels)
            counts += torch.bincount(new_labels[moved], minlength=k) - torch.bincount(labels[moved], minlength=k)
            labels = new_labels
        empty = counts == 0
        sums[empty] = 0.0  # drop the float64 residue of removed rows, so a refilled cluster starts clean
        means = (sums / counts.clamp_min(1).unsqueeze(1)).to(flat.dtype)
        old = centroids
        centroids = torch.where(empty.unsqueeze(1), old, means)
        if torch.allclose(centroids, old, rtol=rtol):
            break
    return (labels.reshape(grid) if grid is not None else labels), centroids
