"""COCO result records: the one function that turns one image's detections into what evaluation and JSON files hold.

A COCO result record is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}`` with the
RLE compressed and its ``counts`` a ``str`` (JSON-ready). ``COCOEvaluator``, the instance-segmentation task's
``predict`` and Zip all build their records here, so that a results JSON written by any of them reads the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from visionkit.eval.rle import encode_masks, rle_to_bbox

__all__ = ["coco_result_records"]


def _as_float64(values: Tensor | np.ndarray | Sequence[Any], name: str) -> Tensor:
    try:
        return torch.as_tensor(values).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be numeric, got {type(values).__name__}") from error


def coco_result_records(
    image_id: int,
    scores: Tensor | Sequence[float],
    category_ids: Tensor | Sequence[int],
    *,
    boxes: Tensor | Sequence[Sequence[float]] | None = None,
    masks: Tensor | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """COCO result records of one image's ``K`` detections.

    Args:
        image_id: The image's COCO id.
        scores: ``(K,)`` finite confidences.
        category_ids: ``(K,)`` COCO category ids (dataset ids, not contiguous labels).
        boxes: ``(K, 4)`` xyxy boxes in original image pixels; ``None``: each record's ``bbox`` is its mask's tight box
            (``masks`` needed then).
        masks: ``(K, H, W)`` bool (or 0/1) masks at the original image size; ``None``: no ``segmentation`` key.

    Returns:
        ``K`` records in input order: ``bbox`` xywh floats, ``score`` float, ``segmentation`` compressed RLE with
        ``str`` counts when ``masks`` is given.

    Raises:
        ValueError: On inconsistent lengths, boxes that are not ``(K, 4)`` finite xyxy with ``x2 >= x1`` and
            ``y2 >= y1``, non-finite scores, or neither ``boxes`` nor ``masks``.
    """
    score_values = _as_float64(scores, "scores").reshape(-1)
    ids = [int(c) for c in (category_ids.tolist() if isinstance(category_ids, Tensor) else category_ids)]
    count = score_values.numel()
    if len(ids) != count:
        raise ValueError(f"prediction for image {image_id}: got {count} scores and {len(ids)} category ids")
    if not bool(score_values.isfinite().all()):
        raise ValueError(f"prediction for image {image_id}: scores must be finite")
    if boxes is None and masks is None:
        raise ValueError("coco_result_records needs boxes, masks or both")
    rles = encode_masks(masks.cpu() if isinstance(masks, Tensor) else masks) if masks is not None else None
    if rles is not None and len(rles) != count:
        raise ValueError(f"prediction for image {image_id}: got {len(rles)} masks for {count} scores")
    if boxes is not None:
        xyxy = _as_float64(boxes, "boxes")
        if xyxy.shape != (count, 4):
            raise ValueError(
                f"prediction for image {image_id}: boxes must be (K, 4) = ({count}, 4), got {tuple(xyxy.shape)}"
            )
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        if not bool(torch.isfinite(xywh).all()) or bool((xywh[:, 2:] < 0).any()):
            raise ValueError(f"prediction for image {image_id}: boxes must be finite xyxy with x2 >= x1, y2 >= y1")
        bboxes = xywh.tolist()
    else:
        assert rles is not None
        bboxes = [rle_to_bbox(rle) for rle in rles]
    records: list[dict[str, Any]] = [
        {"image_id": int(image_id), "category_id": category_id, "bbox": bbox, "score": score}
        for category_id, bbox, score in zip(ids, bboxes, score_values.tolist(), strict=True)
    ]
    if rles is not None:
        for record, rle in zip(records, rles, strict=True):
            record["segmentation"] = rle
    return records
