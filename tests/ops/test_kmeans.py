"""Tests for visionkit.methods.zip.clustering: K-means against the released Zip loop (zip_utils.py, c54c646)."""

import pytest
import torch

from visionkit.ops import kmeans, raster_init_indices


def released_kmeans(x, k=20, iters=100, init_idx=None, rtol=1e-5):
    """The released loop, written out: cdist + argmin, per-cluster mean loop, allclose stop. Labels 0..k-1."""
    if init_idx is None:
        init_idx = torch.unique(torch.round(torch.linspace(0, x.shape[0] - 1, k))).long()
    centroids = x[init_idx]
    for _ in range(iters):
        labels = torch.argmin(torch.cdist(x, centroids, p=2), dim=1)
        old = centroids.clone()
        for j in range(k):
            members = x[labels == j]
            if len(members) > 0:
                centroids[j] = members.mean(dim=0)
            else:
                centroids[j] = old[j]
        if torch.allclose(centroids, old, rtol=rtol):
            break
    return labels, centroids


def blobs(n, d, centres=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(centres, d, generator=g)
    x = torch.randn(n, d, generator=g) + means[torch.randint(centres, (n,), generator=g)]
    return x.to(dtype)


@pytest.mark.parametrize(
    ("n", "d", "k", "seed"),
    [(600, 16, 20, 0), (2000, 64, 20, 1), (1500, 3, 7, 2), (30, 5, 20, 3), (20, 4, 20, 4), (24, 2, 5, 5)],
)
def test_matches_released_loop(n, d, k, seed):
    x = blobs(n, d, seed=seed)
    ref_labels, ref_centroids = released_kmeans(x.clone(), k)
    labels, centroids = kmeans(x, k)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)


def test_every_iteration_cap_matches_released_loop():
    # The labels returned after i iterations are the i-th assignment, whatever i is, and the stop rule fires at the
    # same iteration (capping at or beyond it changes nothing).
    x = blobs(400, 8, centres=6, seed=7)
    for iters in [1, 2, 3, 5, 8, 13, 100]:
        ref_labels, ref_centroids = released_kmeans(x.clone(), 20, iters)
        labels, centroids = kmeans(x, 20, iters=iters)
        assert torch.equal(labels, ref_labels), iters
        torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)


def test_stop_rule_tolerance_is_relative_as_released():
    # Features far from the origin: centroids move by ~1e-3 of their size per iteration, so rtol decides when to stop.
    x = 100 + blobs(300, 4, centres=4, seed=9)
    results = {}
    for rtol in [1e-5, 1e-2]:
        ref_labels, ref_centroids = released_kmeans(x.clone(), 6, rtol=rtol)
        labels, centroids = kmeans(x, 6, rtol=rtol)
        assert torch.equal(labels, ref_labels), rtol
        torch.testing.assert_close(centroids, ref_centroids, rtol=1e-6, atol=1e-4)
        results[rtol] = labels
    assert not torch.equal(results[1e-5], results[1e-2])  # the loose tolerance stopped earlier


def test_empty_cluster_keeps_its_centroid():
    x = blobs(200, 6, seed=3)
    init = raster_init_indices(200, 5)  # rows 0, 50, 100, 149, 199
    x[init[3]] = x[init[2]]  # centroids 2 and 3 start equal: ties go to 2, so cluster 3 starts empty
    labels, centroids = kmeans(x, 5, iters=1)
    assert not (labels == 3).any()
    assert torch.equal(centroids[3], x[init[3]])
    ref_labels, ref_centroids = released_kmeans(x.clone(), 5)
    labels, centroids = kmeans(x, 5)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)


def test_raster_init_indices_hand_worked():
    assert raster_init_indices(10, 4).tolist() == [0, 3, 6, 9]
    # linspace(0, 10, 5) = 0, 2.5, 5, 7.5, 10: torch.round rounds half to even
    assert raster_init_indices(11, 5).tolist() == [0, 2, 5, 8, 10]
    # fewer points than clusters: duplicates removed, as released
    assert raster_init_indices(3, 5).tolist() == [0, 1, 2]
    # the released call for a 128 x 170 grid (RN50x64 layer3 of a 640x480 COCO image), k = 20
    idx = raster_init_indices(128 * 170, 20)
    expected = torch.unique(torch.round(torch.linspace(0, 128 * 170 - 1, 20))).long()
    assert torch.equal(idx, expected) and idx.numel() == 20 and idx[0] == 0 and idx[-1] == 128 * 170 - 1


def test_initial_centroids_are_the_raster_rows():
    x = blobs(100, 4, seed=1)
    _, centroids = kmeans(x, 4, iters=1)
    labels = torch.cdist(x, x[[0, 33, 66, 99]]).argmin(1)
    expected = torch.stack([x[labels == j].mean(0) for j in range(4)])
    torch.testing.assert_close(centroids, expected, rtol=1e-6, atol=1e-6)


def test_feature_map_input_is_read_in_raster_order():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(8, 12, 15, generator=g)  # (D, h, w)
    labels, centroids = kmeans(fmap, k=6)
    flat_labels, flat_centroids = kmeans(fmap.permute(1, 2, 0).reshape(-1, 8), k=6)
    assert labels.shape == (12, 15)
    assert torch.equal(labels.reshape(-1), flat_labels)
    assert torch.equal(centroids, flat_centroids)


def test_float64_matches_released_loop():
    x = blobs(500, 10, seed=11, dtype=torch.float64)
    ref_labels, ref_centroids = released_kmeans(x.clone(), 8)
    labels, centroids = kmeans(x, 8)
    assert centroids.dtype == torch.float64
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-10, atol=1e-10)


def test_random_init_is_seeded_and_matches_released_loop():
    x = blobs(300, 5, seed=2)
    labels_a, centroids_a = kmeans(x, 6, init="random", generator=torch.Generator().manual_seed(5))
    labels_b, centroids_b = kmeans(x, 6, init="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(labels_a, labels_b) and torch.equal(centroids_a, centroids_b)
    # demo.ipynb: torch.randint(N, (k,)) rows, with replacement
    init = torch.randint(300, (6,), generator=torch.Generator().manual_seed(5))
    ref_labels, _ = released_kmeans(x.clone(), 6, init_idx=init)
    assert torch.equal(labels_a, ref_labels)


def test_errors():
    x = torch.randn(50, 3)
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        kmeans(x, 4, init="random")
    with pytest.raises(ValueError, match="unknown kmeans init 'semantic'"):
        kmeans(x, 4, init="semantic")
    with pytest.raises(ValueError, match="at least k=20 points, got 10"):
        kmeans(x[:10], 20)
    with pytest.raises(ValueError, match=r"\(N, D\) or \(D, h, w\)"):
        kmeans(torch.randn(2, 3, 4, 5), 4)
    with pytest.raises(ValueError, match="floating-point"):
        kmeans(torch.ones(50, 3, dtype=torch.int64), 4)
