"""Semantic segmentation metrics (mIoU, mDice, aAcc, mAcc) from one dataset-wide confusion matrix.

The mmseg / CSAIL ADE20K protocol: intersection and union are summed over the whole evaluation set before dividing
(not averaged per image, which is a different quantity — torchmetrics' ``MeanIoU``), then the per-class IoU are
averaged over the classes that occur. Dice is mmseg's ``mDice``, 2·TP / (2·TP + FP + FN) from the same sums. Pixels
whose target equals ``ignore_index`` (255) are skipped. Conventions in docs/eval/segmentation.md.

:class:`SegmentationEvaluator` is a torchmetrics ``Metric`` whose one state, the confusion matrix, is summed over the
processes by torchmetrics when ``compute`` runs under ``torch.distributed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from visionkit.utils.constants import IGNORE_INDEX

__all__ = ["SegmentationEvaluator"]


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the non-nan entries; ``nan`` when there are none (without numpy's empty-slice warning)."""
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else math.nan


class SegmentationEvaluator(Metric):
    """Accumulates a ``(C, C)`` int64 confusion matrix (rows: target class, columns: predicted class).

    Args:
        num_classes: Number of classes ``C``; labels are ``0..C-1``.
        ignore_index: Target value whose pixels are skipped (ADE20K with ``reduce_zero_label``: 255).
        class_names: ``C`` names used in the per-class keys; default ``"0"``, ``"1"``, ...
        foreground_index: For foreground/background datasets (lesion, nodule, organ), the foreground class: its
            ``IoU`` and ``Dice`` are also reported as ``IoU_fg`` and ``Dice_fg``. ``None``: not reported.

    Conventions of ``compute``: fractions in ``[0, 1]``. A class whose union is empty (absent from target and
    prediction over the whole set) has ``IoU`` and ``Dice`` ``nan`` and is left out of ``mIoU`` and ``mDice``; a
    class absent from the target has ``Acc`` ``nan`` (0/0) and is left out of ``mAcc``. With no valid pixel at all
    every value is ``nan``.

    The matrix lives on the device of the latest ``update`` (the evaluator moves itself there), so that a NCCL
    process group can sum it.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    confusion_matrix: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        foreground_index: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class label (num_classes={num_classes})")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={num_classes}")
        if foreground_index is not None and not 0 <= foreground_index < num_classes:
            raise ValueError(f"foreground_index {foreground_index} is not a class label 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.foreground_index = foreground_index
        self.ignore_index = ignore_index
        self.class_names = [str(name) for name in class_names] if class_names is not None else None
        self.add_state(
            "confusion_matrix", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch to the confusion matrix.

        Args:
            pred: ``(B, H, W)`` or ``(H, W)`` integer class ids (argmax of the logits), any device.
            target: Same shape, integer class ids or ``ignore_index``.

        Raises:
            ValueError: On a shape mismatch, non-integer input, or labels outside ``0..C-1`` (targets may also be
                ``ignore_index``).
        """
        if pred.shape != target.shape or pred.ndim not in (2, 3):
            raise ValueError(
                f"pred and target must both be (B, H, W) or (H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point() or pred.is_complex() or target.is_complex():
            raise ValueError(
                f"pred and target must hold integer class ids (argmax the logits first), got {pred.dtype} and "
                f"{target.dtype}"
            )
        target = target.to(pred.device).long()
        pred = pred.long()
        valid = target != self.ignore_index
        target_valid = target[valid]
        pred_valid = pred[valid]
        num_classes = self.num_classes
        if target_valid.numel() and (target_valid.min() < 0 or target_valid.max() >= num_classes):
            bad = target_valid[(target_valid < 0) | (target_valid >= num_classes)].unique()[:10].tolist()
            raise ValueError(
                f"target holds labels {bad} outside 0..{num_classes - 1} (ignore_index {self.ignore_index})"
            )
        if pred_valid.numel() and (pred_valid.min() < 0 or pred_valid.max() >= num_classes):
            bad = pred_valid[(pred_valid < 0) | (pred_valid >= num_classes)].unique()[:10].tolist()
            raise ValueError(f"pred holds labels {bad} outside 0..{num_classes - 1}")
        counts = torch.bincount(target_valid * num_classes + pred_valid, minlength=num_classes * num_classes)
        if self.confusion_matrix.device != counts.device:
            self.to(counts.device)
        self.confusion_matrix += counts.reshape(num_classes, num_classes)

    def compute(self) -> dict[str, float]:
        """Metrics of everything seen so far (on all ranks; ``reset`` zeroes the matrix).

        Returns:
            ``mIoU``, ``aAcc`` (pixel accuracy), ``mAcc`` (mean class accuracy), ``mDice``, with ``foreground_index``
            ``IoU_fg`` and ``Dice_fg``, then ``IoU/<name>``, ``Acc/<name>`` and ``Dice/<name>`` per class. Python
            floats, ``nan`` as documented in the class docstring.
        """
        matrix = self.confusion_matrix.detach().cpu().double()
        true_positive = matrix.diagonal()
        target_count = matrix.sum(dim=1)
        pred_count = matrix.sum(dim=0)
        union = target_count + pred_count - true_positive
        nan = torch.full_like(true_positive, math.nan)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
        accuracy = torch.where(target_count > 0, true_positive / target_count.clamp(min=1), nan)
        # 2TP + FP + FN = target count + prediction count; zero exactly when the union is.
        dice = torch.where(union > 0, 2 * true_positive / (target_count + pred_count).clamp(min=1), nan)
        total = float(matrix.sum())
        metrics = {
            "mIoU": _nanmean(iou),
            "aAcc": float(true_positive.sum()) / total if total > 0 else math.nan,
            "mAcc": _nanmean(accuracy),
            "mDice": _nanmean(dice),
        }
        if self.foreground_index is not None:
            metrics["IoU_fg"] = float(iou[self.foreground_index])
            metrics["Dice_fg"] = float(dice[self.foreground_index])
        names = self.class_names or [str(index) for index in range(self.num_classes)]
        metrics.update({f"IoU/{name}": float(value) for name, value in zip(names, iou, strict=True)})
        metrics.update({f"Acc/{name}": float(value) for name, value in zip(names, accuracy, strict=True)})
        metrics.update({f"Dice/{name}": float(value) for name, value in zip(names, dice, strict=True)})
        return metrics
