"""Zip's steps after SAM: which classes are present, instance scores and mask NMS.

The paper's classification-first rule, its score terms and any NMS are unpublished (``docs/methods/zip.md`` §3,
§6); the choices here are visionkit's, documented in ``docs/methods/zip.md`` §8 and configurable:

* :func:`select_present_classes`: CLIP's image-level softmax over the vocabulary (logit scale 100, as CLIP's
  zero-shot classifier); a class is "present" if its probability is at least ``min_prob`` and it is among the
  ``top_k`` most probable; the most probable class is always kept (an image shows at least one thing).
* :func:`score_instances`: the geometric mean sqrt(CLIP class score x SAM predicted IoU) (reviewer R4's description).
* :func:`mask_nms`: greedy NMS on mask IoU, per class (off by default in the segmenter, as in the released code).
* :func:`mask_boxes`: the tight box of each mask, the box a COCO record reports (pycocotools' ``toBbox``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mask_boxes", "mask_iou", "mask_nms", "score_instances", "select_present_classes"]


def select_present_classes(probs: Tensor, min_prob: float = 0.05, top_k: int = 5) -> Tensor:
    """Classification-first: the vocabulary indices judged present in an image.

    Args:
        probs: Image-level class probabilities, (C,) (softmax over the vocabulary).
        min_prob: Keep classes with at least this probability.
        top_k: Keep at most this many (the most probable first).

    Returns:
        Sorted (by probability, descending) int64 indices, at least one.
    """
    if probs.dim() != 1 or probs.numel() == 0:
        raise ValueError(f"probs must be a non-empty (C,) vector, got shape {tuple(probs.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    order = torch.argsort(probs, descending=True, stable=True)[:top_k]
    keep = probs[order] >= min_prob
    keep[0] = True
    return order[keep]


def score_instances(class_scores: Tensor, sam_scores: Tensor) -> Tensor:
    """Instance confidence: the geometric mean of the CLIP class score and SAM's predicted IoU.

    Args:
        class_scores: (K,) CLIP scores in [0, 1] of each instance's class.
        sam_scores: (K,) SAM predicted IoUs (may leave [0, 1] slightly; clamped).

    Returns:
        (K,) scores in [0, 1].
    """
    return torch.sqrt(class_scores.clamp(0, 1) * sam_scores.clamp(0, 1))


def mask_iou(masks: Tensor) -> Tensor:
    """Pairwise IoU of binary masks (K, H, W) -> (K, K), by one matrix product of the flattened masks."""
    flat = masks.reshape(masks.shape[0], -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float = 0.5, labels: Tensor | None = None) -> Tensor:
    """Greedy non-maximum suppression on mask IoU.

    Args:
        masks: (K, H, W) bool.
        scores: (K,).
        iou_thresh: A mask is suppressed by a higher-scoring kept mask with IoU above this.
        labels: Optional (K,) classes; masks of different classes never suppress each other.

    Returns:
        Indices of the kept masks, highest score first.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=masks.device)
    iou = mask_iou(masks)
    if labels is not None:
        iou = torch.where(labels[:, None] == labels[None, :], iou, torch.zeros_like(iou))
    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_thresh
    return torch.tensor(keep, dtype=torch.int64, device=masks.device)


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy box of each mask, maxima exclusive (pycocotools' ``toBbox`` as xyxy); an empty mask gets zeros.

    Args:
        masks: (K, H, W) bool.

    Returns:
        (K, 4) float32 ``(x1, y1, x2, y2)`` in pixels, ``x2 - x1`` = the mask's width in pixels.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)

    def span(occupied: Tensor) -> tuple[Tensor, Tensor]:  # (K, L) bool -> first index, last index + 1
        first = occupied.float().argmax(dim=1)
        return first, occupied.shape[1] - occupied.flip(1).float().argmax(dim=1)

    (x1, x2), (y1, y2) = span(masks.any(dim=1)), span(masks.any(dim=2))
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(masks.flatten(1).any(dim=1)[:, None], boxes, torch.zeros_like(boxes))
