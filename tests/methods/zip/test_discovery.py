"""Tests for visionkit.methods.zip.discovery against skimage and the released Zip loop (zip_utils.py, c54c646)."""

from collections import Counter

import numpy as np
import pytest
import torch

from visionkit.methods.zip import (
    connected_components,
    discover_instances,
    grid_boxes_to_image,
    region_props,
    select_fragments,
)

measure = pytest.importorskip("skimage.measure")


def released_select(clusters, active, top_k=20):
    """The released per-cluster, per-fragment loop over full-size masks (clusters 0..k-1 -> released 1..k)."""
    labels = clusters + 1
    overall = np.zeros(labels.shape)
    for cluster, _ in Counter((labels * active).flatten()).most_common(top_k):
        if cluster == 0:
            continue
        fragments = measure.label(np.float64(labels == cluster), connectivity=1, background=0)
        for prop in measure.regionprops(fragments):
            fragment = np.float64(fragments == prop.label)
            gain = np.sum(fragment * active) / np.sum(fragment)
            b = prop.bbox
            if gain > 0.3 and (b[2] - b[0]) * (b[3] - b[1]) / prop.area < 3:
                overall = overall + fragment
    return overall != 0


def released_boxes(kept, min_area=100):
    props = measure.regionprops(measure.label(kept, connectivity=1, background=0))
    boxes = [[p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]] for p in props if p.area >= min_area]
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def noisy_clusters(rng, h, w, k, noise):
    """Blocky cluster map with a fraction ``noise`` of cells relabelled at random (many small fragments)."""
    bh, bw = rng.integers(2, 10, 2)
    blocks = rng.integers(0, k, (h // bh + 1, w // bw + 1))
    clusters = np.kron(blocks, np.ones((bh, bw), dtype=np.int64))[:h, :w]
    flip = rng.random((h, w)) < noise
    clusters[flip] = rng.integers(0, k, int(flip.sum()))
    return clusters


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_equals_skimage(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(60):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        expected = measure.label(mask, connectivity=connectivity // 4, background=0)
        labels = connected_components(torch.from_numpy(mask), connectivity)
        assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), expected)  # same numbering, not only the same partition
        np.testing.assert_array_equal(connected_components(mask.astype(np.uint8), connectivity), expected)


def test_connected_components_spiral_and_errors():
    # a one-cell-wide square spiral: long paths, many merges
    n = 41
    grid = np.zeros((n, n), dtype=bool)
    r0, c0, r1, c1 = 0, 0, n - 1, n - 1
    while r0 <= r1 and c0 <= c1:
        grid[r0, c0 : c1 + 1] = grid[r0 : r1 + 1, c1] = grid[r1, c0 : c1 + 1] = True
        grid[r0 + 2 : r1 + 1, c0] = True
        r0, c0, r1, c1 = r0 + 2, c0 + 2, r1 - 2, c1 - 2
    np.testing.assert_array_equal(connected_components(grid), measure.label(grid, connectivity=1))
    with pytest.raises(ValueError, match="2-D mask"):
        connected_components(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        connected_components(torch.zeros(3, 4), connectivity=6)


def test_region_props_hand_worked():
    labels = torch.tensor([[0, 1, 1, 0], [2, 0, 1, 0], [2, 0, 0, 3]])
    area, boxes = region_props(labels)
    assert area.tolist() == [3, 2, 1]
    assert boxes.tolist() == [[1, 0, 3, 2], [0, 1, 1, 3], [3, 2, 4, 3]]


def test_select_fragments_equals_released_loop_on_noisy_maps():
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(25):
        h, w = rng.integers(8, 60, 2)
        k = int(rng.integers(2, 30))
        clusters = noisy_clusters(rng, h, w, k, rng.random() * 0.4)
        active = rng.random((h, w)) < rng.random()
        expected = released_select(clusters, active)
        kept = select_fragments(torch.from_numpy(clusters), torch.from_numpy(active))
        assert kept.dtype == torch.bool
        np.testing.assert_array_equal(kept.numpy(), expected)
        np.testing.assert_array_equal(discover_instances(kept, 5).numpy(), released_boxes(expected, 5))
        total += int(expected.sum())
    assert total > 0  # the comparison covered kept fragments, not only empty masks


def square_scene(border_cluster):
    """Two same-class objects (cluster 1) meeting along a staircase diagonal (cluster ``border_cluster``)."""
    clusters = np.zeros((40, 40), dtype=np.int64)
    rr, cc = np.mgrid[0:32, 0:32]
    square = np.where(cc - rr < 0, 1, np.where(cc - rr > 1, 1, border_cluster))
    clusters[4:36, 4:36] = square
    active = clusters > 0
    return torch.from_numpy(clusters), torch.from_numpy(active)


def test_touching_objects_split_by_their_border_cluster():
    clusters, active = square_scene(border_cluster=2)
    kept = select_fragments(clusters, active)
    # the 63-cell staircase fills 63 / 1024 of its box: rejected by compactness
    assert not kept[clusters == 2].any() and kept[clusters == 1].all()
    boxes = discover_instances(kept)
    # upper-right triangle first (its first cell comes first in raster order), then the lower-left one
    assert boxes.tolist() == [[6, 4, 36, 34], [4, 5, 35, 36]]


def test_touching_objects_without_border_cluster_stay_one():
    clusters, active = square_scene(border_cluster=1)
    boxes = discover_instances(select_fragments(clusters, active))
    assert boxes.tolist() == [[4, 4, 36, 36]]


def test_compactness_rejects_l_and_diagonal_strips():
    clusters = np.zeros((30, 30), dtype=np.int64)
    clusters[2, 2:11] = clusters[2:6, 2] = 1  # L, arms 4 x 9: 12 cells, box 36 -> ratio 3.0, not < 3
    clusters[10, 2:10] = clusters[10:14, 2] = 2  # L, arms 4 x 8: 11 cells, box 32 -> 2.91, kept
    for i in range(8):  # staircase diagonal: 16 cells, box 8 x 9 -> 4.5
        clusters[18 + i, 2 + i : 4 + i] = 3
    clusters[28, 2:20] = 4  # straight strip: ratio 1, kept
    kept = select_fragments(torch.from_numpy(clusters), torch.ones(30, 30, dtype=torch.bool)).numpy()
    assert not kept[clusters == 1].any()
    assert kept[clusters == 2].all()
    assert not kept[clusters == 3].any()
    assert kept[clusters == 4].all()


@pytest.mark.parametrize(("inside", "kept"), [(5, False), (6, False), (7, True), (20, True)])
def test_gain_rejects_strip_outside_activation(inside, kept):
    clusters = np.zeros((10, 30), dtype=np.int64)
    clusters[5, 5:25] = 1  # straight 1 x 20 strip: compact
    active = np.zeros((10, 30), dtype=bool)
    active[0:3, :] = True  # some of cluster 0 activated as well
    active[5, 5 : 5 + inside] = True  # gain = inside / 20 must be > 0.3 (6 / 20 is not)
    result = select_fragments(torch.from_numpy(clusters), torch.from_numpy(active)).numpy()
    assert result[clusters == 1].all() == kept and result[clusters == 1].any() == kept


def test_top_k_counts_outside_as_a_label_and_breaks_ties_by_first_appearance():
    ones = torch.ones(1, 8, dtype=torch.bool)
    # all counts tie at 2: the first two labels met in raster order are examined, whatever their ids
    kept = select_fragments(torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]]), ones, top_k=2)
    assert kept.tolist() == [[True] * 4 + [False] * 4]
    kept = select_fragments(torch.tensor([[3, 3, 2, 2, 1, 1, 0, 0]]), ones, top_k=2)
    assert kept.tolist() == [[True] * 4 + [False] * 4]
    # "outside the activation" (3 cells) is the most common label and takes one of the two slots
    active = torch.tensor([[False] * 3 + [True] * 5])
    kept = select_fragments(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3]]), active, top_k=2)
    assert kept.tolist() == [[False] * 3 + [True] * 2 + [False] * 3]


def test_discover_instances_min_area_and_exclusive_corners():
    kept = torch.zeros(30, 40, dtype=torch.bool)
    kept[0:10, 0:10] = True  # 100 cells: kept
    kept[15:26, 0:9] = True  # 99 cells: dropped
    kept[15:26, 20:29] = True  # 99 cells ...
    kept[20, 29] = True  # ... plus one touching by an edge: 100 cells, kept
    kept[0:10, 20:30] = True  # 100 cells
    boxes = discover_instances(kept)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[0, 0, 10, 10], [20, 0, 30, 10], [20, 15, 30, 26]]
    assert discover_instances(torch.zeros(5, 5, dtype=torch.bool)).shape == (0, 4)


def test_grid_boxes_to_image():
    boxes = torch.tensor([[0.0, 0.0, 170.0, 128.0], [17.0, 64.0, 34.0, 96.0]])
    out = grid_boxes_to_image(boxes, (128, 170), (480, 640))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 640.0, 480.0], [64.0, 240.0, 128.0, 360.0]]))
    # released resize_pos: x scaled by image_h / grid_h (3.75), y by image_w / grid_w (640 / 170)
    quirk = grid_boxes_to_image(boxes, (128, 170), (480, 640), released_quirk=True)
    torch.testing.assert_close(quirk[0], torch.tensor([0.0, 0.0, 637.5, 128 * 640 / 170]))


def test_select_fragments_errors():
    c = torch.zeros(4, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        select_fragments(c, torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        select_fragments(c, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="integer label map"):
        select_fragments(c.float(), torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels >= 0"):
        select_fragments(c - 1, torch.zeros(4, 5, dtype=torch.bool))
