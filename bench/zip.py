"""Benchmark: Zip's clustering and discovery core against the released code's loops, side by side in one process.

Parts (``--parts``, default all):

(a) K-means on a 128 x 170 grid of 2048-d features (the RN50x64 layer3 grid of a 640 x 480 COCO image at short side
    2048), k = 20, raster init, up to 100 iterations, rtol 1e-5: ``visionkit.methods.zip.kmeans`` vs the released
    loop (``zip_utils.py``: ``torch.cdist`` + argmin, then a Python loop over the 20 clusters taking boolean-mask
    means). Both run to the released stop rule; the labels must be identical. The GEMM bound is the time of one
    ``(N, D) @ (D, k)`` matmul times the number of iterations run: an iteration cannot cost less than the distance
    GEMM. The features are synthetic but shaped like real ones: non-negative (post-ReLU), piecewise-constant over 12
    Voronoi regions, plus a smooth field and noise, so K-means converges in a few dozen iterations as on images.
(b) Fragment selection + instance discovery (``select_fragments`` + ``discover_instances``) on noisy 128 x 170 cluster
    maps (blocky clusters, a fraction of cells relabelled at random: hundreds of examined fragments) with a blob-shaped
    activation, vs the released per-cluster / per-fragment loop over full-size masks with ``skimage.measure`` (label,
    regionprops, a float64 mask per fragment). Kept masks and boxes must be identical.
(c) SAM decoding of 50 boxes on one embedded image in one batched call (``SamBoxPrompter.predict_boxes``) vs 50
    calls of one box each (what a per-box ``SamPredictor.predict`` loop does); random-weight ``vit_b`` by default
    (the decoder is the same for ViT-B/L/H), or ``--sam-checkpoint``. No target: one call saves 49 rounds of
    kernel launches on a GPU, while on a small CPU the decoder is memory-bound and one call over 50 prompts (each
    cross-attending the 64x64 image tokens) can be slower than 50 cache-sized calls; the run prints which it is.

Times are the median of ``--repeats`` runs after one warm-up; ratio = released / ours. Seeds are fixed. Needs
scikit-image (the ``dev`` extra) for part (b)'s baseline.

Usage::

    .venv/bin/python bench/zip.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from visionkit.methods.zip import discover_instances, kmeans, select_fragments

GRID = (128, 170)  # RN50x64 layer3 grid of a 640x480 image resized to short side 2048 (docs/methods/zip.md §4)
DIM = 2048  # RN50x64 layer3 channels (docs/methods/zip.md §4)
K = 20  # zip_utils.py


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---------------------------------------------------------------- (a) k-means


def synthetic_features(h: int, w: int, d: int, regions: int = 12, seed: int = 0) -> torch.Tensor:
    """``(h·w, d)`` non-negative features, piecewise constant over Voronoi regions plus a smooth field and noise."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.rand(regions, 2, generator=g) * torch.tensor([h, w])
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    region = torch.cdist(torch.stack([yy, xx], -1).reshape(-1, 2), seeds).argmin(1)
    base = torch.relu(torch.randn(regions, d, generator=g))
    low = torch.randn(1, 8, h // 16 + 1, w // 16 + 1, generator=g)
    field = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    smooth = field.reshape(8, -1).T @ (0.3 * torch.randn(8, d, generator=g))
    return torch.relu(base[region] + smooth + 0.3 * torch.randn(h * w, d, generator=g)).contiguous()


def released_kmeans(x: torch.Tensor, k: int = K, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The released loop (zip_utils.py, c54c646), labels 0..k-1; also returns the number of iterations run."""
    idx = torch.unique(torch.round(torch.linspace(0, x.shape[0] - 1, k))).long()
    centroids = x[idx]
    it = 0
    for it in range(iters):  # noqa: B007 (the count is returned)
        labels = torch.argmin(torch.cdist(x, centroids, p=2), dim=1)
        old = centroids.clone()
        for j in range(k):
            members = x[labels == j]
            centroids[j] = members.mean(dim=0) if len(members) > 0 else old[j]
        if torch.allclose(centroids, old, rtol=1e-5):
            break
    return labels, centroids, it + 1


def part_a_kmeans(args: argparse.Namespace) -> list[tuple[str, ...]]:
    h, w = GRID
    x = synthetic_features(h, w, DIM, seed=0)
    t_ref, (ref_labels, ref_centroids, n_iter) = timed(lambda: released_kmeans(x.clone()), args.repeats)
    t_ours, (labels, centroids) = timed(lambda: kmeans(x, K), args.repeats)
    c = torch.randn(K, DIM, generator=torch.Generator().manual_seed(1))
    t_gemm, _ = timed(lambda: x @ c.T, max(args.repeats, 5))
    same = torch.equal(labels, ref_labels)
    dc = (centroids - ref_centroids).abs().max().item()
    bound = t_gemm * n_iter
    return [
        (
            f"(a) kmeans {h}x{w}x{DIM}, k={K}, {n_iter} it",
            f"{t_ref:.2f} s",
            f"{t_ours:.2f} s",
            f"{t_ref / t_ours:.1f}x",
            ">= 5x",
            f"labels {'identical' if same else 'DIFFER'}; max |dcentroid| {dc:.1e}",
        ),
        (
            f"    GEMM bound: ({h * w},{DIM})x({DIM},{K}) x {n_iter} it",
            "",
            f"{bound:.2f} s",
            f"ours/bound {t_ours / bound:.2f}",
            "",
            f"one GEMM {t_gemm * 1e3:.1f} ms",
        ),
    ]


# ---------------------------------------------------------------- (b) fragments + discovery


def noisy_clusters(rng: np.random.Generator, h: int, w: int, k: int, noise: float) -> np.ndarray:
    """Blocky cluster map (blocks of 4..11 cells) with a fraction ``noise`` of cells relabelled at random."""
    bh, bw = rng.integers(4, 12, 2)
    blocks = rng.integers(0, k, (h // bh + 1, w // bw + 1))
    clusters = np.kron(blocks, np.ones((bh, bw), dtype=np.int64))[:h, :w]
    flip = rng.random((h, w)) < noise
    clusters[flip] = rng.integers(0, k, int(flip.sum()))
    return clusters


def blob_activation(rng: np.random.Generator, h: int, w: int, blobs: int = 4) -> np.ndarray:
    """Union of random ellipses, like a thresholded CLIP activation map."""
    yy, xx = np.mgrid[0:h, 0:w]
    active = np.zeros((h, w), dtype=bool)
    for _ in range(blobs):
        cy, cx = rng.random() * h, rng.random() * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        active |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return active


def released_discovery(clusters: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """zip_utils.py's fragment loop and box step (clusters 0..k-1 -> released 1..k); also the fragments examined."""
    from skimage import measure

    labels = clusters + 1
    overall = np.float64(labels == -1)
    examined = 0
    for cluster, _ in Counter(np.asarray((labels * active).flatten())).most_common(20):
        if cluster == 0:
            continue
        fragments = measure.label(np.float64(labels == cluster), connectivity=1, background=0)
        for prop in measure.regionprops(fragments):
            examined += 1
            fragment = np.float64(fragments == prop.label)
            gain = np.sum(fragment * active) / np.sum(fragment)
            b = prop.bbox
            if gain > 0.3 and (b[2] - b[0]) * (b[3] - b[1]) / prop.area < 3:
                overall = overall + fragment
    kept = overall != 0
    props = measure.regionprops(measure.label(kept, connectivity=1, background=0))
    boxes = [[p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]] for p in props if p.area >= 100]
    return kept, np.array(boxes, dtype=np.float32).reshape(-1, 4), examined


def part_b_discovery(args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows = []
    h, w = GRID
    for seed, noise in [(0, 0.02), (1, 0.05), (2, 0.10)]:
        rng = np.random.default_rng(seed)
        clusters, active = noisy_clusters(rng, h, w, K, noise), blob_activation(rng, h, w)
        c_t, a_t = torch.from_numpy(clusters), torch.from_numpy(active)

        def ours(c_t: torch.Tensor = c_t, a_t: torch.Tensor = a_t) -> tuple[torch.Tensor, torch.Tensor]:
            kept = select_fragments(c_t, a_t)
            return kept, discover_instances(kept)

        def released(c: np.ndarray = clusters, a: np.ndarray = active) -> tuple[np.ndarray, np.ndarray, int]:
            return released_discovery(c, a)

        t_ref, (ref_kept, ref_boxes, examined) = timed(released, args.repeats)
        t_ours, (kept, boxes) = timed(ours, args.repeats)
        same = np.array_equal(kept.numpy(), ref_kept) and np.array_equal(boxes.numpy(), ref_boxes)
        rows.append(
            (
                f"(b) fragments+discovery, noise {noise:.2f}",
                f"{t_ref * 1e3:.1f} ms",
                f"{t_ours * 1e3:.2f} ms",
                f"{t_ref / t_ours:.1f}x",
                ">= 10x",
                f"{examined} fragments, {len(ref_boxes)} boxes; {'identical' if same else 'DIFFER'}",
            )
        )
    return rows


# ---------------------------------------------------------------- (c) SAM decoding


def part_c_sam_decoding(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """SAM decoding of 50 boxes: one batched prompt-encoder + mask-decoder call vs 50 calls of one box.

    SAM's prompt encoder and mask decoder are the same size for ViT-B/L/H (256 channels), so a random-weight
    ``vit_b`` (or ``--sam-checkpoint`` weights) measures them; the image is embedded once and not timed.
    """
    from visionkit.models.foundation import SamBoxPrompter, build_sam, load_sam

    torch.manual_seed(0)
    sam = load_sam(args.sam_variant, args.sam_checkpoint) if args.sam_checkpoint else build_sam(args.sam_variant)
    prompter = SamBoxPrompter(sam.eval())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    prompter.set_images([image])
    xy = rng.uniform(0, 1, (50, 2)) * [560, 400]
    wh = rng.uniform(20, 80, (50, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + wh], axis=1)).float()

    def batched() -> tuple[torch.Tensor, torch.Tensor]:
        masks, ious, _ = prompter.predict_boxes(0, boxes)
        return masks, ious

    def single() -> tuple[torch.Tensor, torch.Tensor]:
        outs = [prompter.predict_boxes(0, boxes[i : i + 1]) for i in range(len(boxes))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    with torch.no_grad():
        t_single, (ref_masks, ref_ious) = timed(single, args.repeats)
        t_batched, (masks, ious) = timed(batched, args.repeats)
    agree = (masks == ref_masks).float().mean().item()
    iou_diff = (ious - ref_ious).abs().max().item()
    return [
        (
            f"(c) SAM {args.sam_variant} decoder, 50 boxes",
            f"{t_single * 1e3:.0f} ms",
            f"{t_batched * 1e3:.0f} ms",
            f"{t_single / t_batched:.1f}x",
            "(none)",
            f"masks agree on {agree:.4%} of pixels, max |IoU diff| {iou_diff:.1e}",
        )
    ]


PARTS = {"a": part_a_kmeans, "b": part_b_discovery, "c": part_c_sam_decoding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab'")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--sam-variant", default="vit_b", help="part (c): vit_b / vit_l / vit_h")
    parser.add_argument("--sam-checkpoint", help="part (c): real SAM weights (default: random weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads")
    print(f"torch {torch.__version__}, numpy {np.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"median of {args.repeats} after 1 warm-up; ratio = released / ours\n")
    header = ("part", "released", "ours", "ratio", "target", "check")
    rows = [header]
    for part in args.parts:
        rows += PARTS[part](args)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(wd) for cell, wd in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
