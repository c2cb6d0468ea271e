"""Zip post-processing: classification-first rule, geometric-mean score, mask NMS, mask boxes."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from visionkit.eval.rle import encode_masks, rle_to_bbox
from visionkit.methods.zip.postprocess import (
    mask_boxes,
    mask_iou,
    mask_nms,
    score_instances,
    select_present_classes,
)


def test_select_present_classes():
    probs = torch.tensor([0.02, 0.6, 0.1, 0.2, 0.08])
    assert select_present_classes(probs, min_prob=0.05, top_k=3).tolist() == [1, 3, 2]
    assert select_present_classes(probs, min_prob=0.15, top_k=5).tolist() == [1, 3]
    # the most probable class is kept even below min_prob
    assert select_present_classes(torch.full((4,), 0.25), min_prob=0.5).tolist() == [0]
    with pytest.raises(ValueError, match="top_k"):
        select_present_classes(probs, top_k=0)
    with pytest.raises(ValueError, match=r"\(C,\) vector"):
        select_present_classes(torch.zeros(2, 2))


def test_score_is_the_geometric_mean():
    scores = score_instances(torch.tensor([0.81, 0.25, 1.0]), torch.tensor([1.0, 0.64, 1.2]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.4, 1.0]))


def test_mask_iou_matches_pycocotools():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 20, 30, generator=g) > 0.6
    masks[5] = False  # empty mask: IoU 0 with everything
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    expected = mask_utils.iou(rles, rles, [0] * 6)
    torch.testing.assert_close(mask_iou(masks).double(), torch.from_numpy(expected), rtol=0, atol=1e-6)


def test_mask_nms_greedy_and_per_class():
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[0, :5, :5] = True  # A
    masks[1, :5, :4] = True  # IoU(A, B) = 20/25 = 0.8
    masks[2, 5:, 5:] = True  # disjoint
    masks[3, :5, :5] = True  # duplicate of A, other class
    scores = torch.tensor([0.9, 0.95, 0.5, 0.4])
    assert mask_nms(masks, scores, iou_thresh=0.5).tolist() == [1, 2]  # B beats A; A suppresses nothing after
    assert mask_nms(masks, scores, iou_thresh=0.85).tolist() == [1, 0, 2]  # 0.8 < 0.85; A kills its duplicate (3)
    labels = torch.tensor([0, 0, 0, 1])
    assert mask_nms(masks, scores, iou_thresh=0.5, labels=labels).tolist() == [1, 2, 3]
    assert mask_nms(masks[:0], scores[:0]).numel() == 0


def test_mask_boxes_are_the_records_bbox():
    # the tight box of each mask, as pycocotools' toBbox gives it (x2 - x1 = width in pixels); zeros for an empty mask
    masks = torch.rand(6, 17, 23, generator=torch.Generator().manual_seed(0)) > 0.97
    masks[2] = False
    masks[3] = False
    masks[3, 16, 22] = True
    boxes = mask_boxes(masks)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).double().tolist()
    assert xywh == [rle_to_bbox(rle) for rle in encode_masks(masks)]
    assert boxes[2].tolist() == [0.0, 0.0, 0.0, 0.0] and boxes[3].tolist() == [22.0, 16.0, 23.0, 17.0]
    assert mask_boxes(masks[:0]).shape == (0, 4)
