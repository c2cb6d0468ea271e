"""Dice (per class, mDice) and the foreground IoU / Dice of SegmentationEvaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visionkit.eval import SegmentationEvaluator

# Rows: target class, columns: predicted class. Class 2 is only predicted (never in the target), class 3 appears
# nowhere.
MATRIX = np.array([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def _pixels(matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 1, N) prediction / target pair whose confusion matrix is ``matrix``."""
    pairs = [(t, p) for t in range(matrix.shape[0]) for p in range(matrix.shape[1]) for _ in range(matrix[t, p])]
    target, pred = zip(*pairs, strict=True)
    return torch.tensor([[pred]]), torch.tensor([[target]])


def _numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict[str, list]:
    """Dice and IoU per class from pixel sets, the textbook way (sklearn's f1_score / jaccard_score, per class)."""
    valid = target != ignore
    pred, target = pred[valid], target[valid]
    dice, iou = [], []
    for k in range(num_classes):
        a, b = pred == k, target == k
        inter, total, union = np.sum(a & b), a.sum() + b.sum(), np.sum(a | b)
        dice.append(2 * inter / total if total else math.nan)
        iou.append(inter / union if union else math.nan)
    return {"dice": dice, "iou": iou}


def test_hand_worked_confusion_matrix() -> None:
    evaluator = SegmentationEvaluator(num_classes=4, class_names=["bg", "lesion", "cyst", "none"])
    pred, target = _pixels(MATRIX)
    # Ignored target pixels change nothing, whatever is predicted there.
    pred = torch.cat([pred, torch.tensor([[[3, 1]]])], dim=-1)
    target = torch.cat([target, torch.tensor([[[255, 255]]])], dim=-1)
    evaluator.update(pred, target)
    metrics = evaluator.compute()
    # bg: TP 5, FN 1, FP 2 -> Dice 10/13, IoU 5/8. lesion: TP 3, FN 3, FP 1 -> Dice 6/10, IoU 3/7.
    # cyst: TP 0, FP 1 -> Dice 0, IoU 0. none: 0/0 -> nan, left out of the means.
    assert metrics["Dice/bg"] == pytest.approx(10 / 13)
    assert metrics["Dice/lesion"] == pytest.approx(0.6)
    assert metrics["Dice/cyst"] == 0.0
    assert math.isnan(metrics["Dice/none"])
    assert metrics["mDice"] == pytest.approx((10 / 13 + 0.6 + 0.0) / 3)
    assert metrics["mIoU"] == pytest.approx((5 / 8 + 3 / 7 + 0.0) / 3)
    assert metrics["IoU/lesion"] == pytest.approx(3 / 7)
    assert "Dice_fg" not in metrics and "IoU_fg" not in metrics
    # The keys that existed before Dice keep their place and values.
    assert list(metrics)[:4] == ["mIoU", "aAcc", "mAcc", "mDice"]
    assert metrics["aAcc"] == pytest.approx(8 / 12) and metrics["mAcc"] == pytest.approx((5 / 6 + 3 / 6) / 2)


def test_dice_equals_the_f1_identity_on_every_class() -> None:
    # Dice = 2 IoU / (1 + IoU) for every class.
    evaluator = SegmentationEvaluator(num_classes=4)
    evaluator.update(*_pixels(MATRIX))
    metrics = evaluator.compute()
    for k in range(3):
        iou = metrics[f"IoU/{k}"]
        assert metrics[f"Dice/{k}"] == pytest.approx(2 * iou / (1 + iou))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_numpy_computation_over_several_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = 5
    evaluator = SegmentationEvaluator(num_classes=num_classes, foreground_index=2)
    preds, targets = [], []
    for _ in range(3):
        target = rng.integers(0, num_classes, size=(2, 9, 11))
        target[rng.random(target.shape) < 0.1] = 255
        target[target == 4] = 3  # class 4 never in the target, sometimes predicted
        pred = np.where(rng.random(target.shape) < 0.6, np.clip(target, 0, 3), rng.integers(0, 5, target.shape))
        evaluator.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    expected = _numpy_metrics(np.concatenate(preds), np.concatenate(targets), num_classes)
    metrics = evaluator.compute()
    for k in range(num_classes):
        np.testing.assert_allclose(metrics[f"Dice/{k}"], expected["dice"][k], rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(metrics[f"IoU/{k}"], expected["iou"][k], rtol=1e-12, equal_nan=True)
    assert metrics["mDice"] == pytest.approx(np.nanmean(expected["dice"]), rel=1e-12)
    assert metrics["Dice_fg"] == metrics["Dice/2"] and metrics["IoU_fg"] == metrics["IoU/2"]


def test_binary_foreground_dataset() -> None:
    # Two images of a lesion dataset: the metrics pool the pixels of both (dataset-wide), not a mean over images.
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 lesion pixels
    target[1, :, :] = 1  # 16 lesion pixels
    pred = target.clone()
    pred[0] = 0  # image 0: lesion missed entirely (per-image Dice 0)
    pred[1, 0, :] = 0  # image 1: 12 of 16 found
    evaluator = SegmentationEvaluator(num_classes=2, foreground_index=1)
    evaluator.update(pred, target)
    metrics = evaluator.compute()
    assert metrics["Dice_fg"] == pytest.approx(2 * 12 / (12 + 20))  # not (0 + 24/28) / 2
    assert metrics["IoU_fg"] == pytest.approx(12 / 20)
    assert metrics["Dice/1"] == metrics["Dice_fg"]


def test_foreground_index_checks_and_empty_input() -> None:
    with pytest.raises(ValueError, match=r"foreground_index 2 is not a class label 0\.\.1"):
        SegmentationEvaluator(num_classes=2, foreground_index=2)
    evaluator = SegmentationEvaluator(num_classes=2, foreground_index=1)
    evaluator.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    metrics = evaluator.compute()
    assert all(math.isnan(metrics[key]) for key in ("mDice", "Dice_fg", "IoU_fg", "Dice/0", "Dice/1"))
