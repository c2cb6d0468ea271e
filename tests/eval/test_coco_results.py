"""coco_result_records: the one builder of COCO result records (evaluator, predict, Zip)."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from visionkit.eval import coco_result_records, decode_rle


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, 12, 16, dtype=torch.bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 7:12, 0:4] = True
    return masks


def test_records_from_masks_take_the_tight_mask_box_and_round_trip():
    masks = _masks()
    records = coco_result_records(42, torch.tensor([0.7, 0.3]), [18, 1], masks=masks)
    assert [r["category_id"] for r in records] == [18, 1] and {r["image_id"] for r in records} == {42}
    # Tight boxes worked out by hand: rows 2..5, cols 3..8 -> x 3, y 2, w 6, h 4.
    assert records[0]["bbox"] == [3.0, 2.0, 6.0, 4.0] and records[1]["bbox"] == [0.0, 7.0, 4.0, 5.0]
    assert records[0]["score"] == pytest.approx(0.7) and isinstance(records[0]["score"], float)
    assert isinstance(records[0]["segmentation"]["counts"], str)
    assert np.array_equal(decode_rle(records[1]["segmentation"]), masks[1].numpy())
    # pycocotools reads the RLE back to the same area.
    rle = dict(records[0]["segmentation"], counts=records[0]["segmentation"]["counts"].encode())
    assert int(mask_utils.area(rle)) == 24
    json.dumps(records)  # JSON-ready


def test_records_from_boxes_convert_xyxy_to_xywh_and_keep_the_given_box():
    boxes = torch.tensor([[1.0, 2.0, 4.5, 10.0], [0.0, 0.0, 0.0, 0.0]])
    records = coco_result_records(3, [0.9, 0.1], torch.tensor([5, 7]), boxes=boxes, masks=_masks())
    assert records[0]["bbox"] == [1.0, 2.0, 3.5, 8.0] and records[1]["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert "segmentation" in records[0]
    no_masks = coco_result_records(3, [0.9, 0.1], [5, 7], boxes=boxes)
    assert all("segmentation" not in r for r in no_masks)


def test_empty_image_gives_no_records():
    assert coco_result_records(1, torch.zeros(0), [], boxes=torch.zeros(0, 4)) == []
    assert coco_result_records(1, torch.zeros(0), [], masks=torch.zeros(0, 4, 4, dtype=torch.bool)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [0.5], "category_ids": [1, 2], "masks": _masks()}, "1 scores and 2 category ids"),
        ({"scores": [0.5, 0.2], "category_ids": [1, 2], "masks": _masks()[:1]}, "1 masks for 2 scores"),
        ({"scores": [0.5], "category_ids": [1], "boxes": [[0, 0, 1]]}, r"boxes must be \(K, 4\)"),
        ({"scores": [0.5], "category_ids": [1], "boxes": [[5, 0, 1, 1]]}, "x2 >= x1"),
        ({"scores": [float("nan")], "category_ids": [1], "boxes": [[0, 0, 1, 1]]}, "scores must be finite"),
        ({"scores": [0.5], "category_ids": [1]}, "needs boxes, masks or both"),
    ],
)
def test_bad_detections_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        coco_result_records(9, **kwargs)
