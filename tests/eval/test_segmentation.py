from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visionkit.eval import SegmentationEvaluator


def test_hand_worked_example() -> None:
    # Valid pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (2,1); the last pixel is ignored.
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    evaluator = SegmentationEvaluator(num_classes=4, class_names=["sky", "road", "car", "boat"])
    evaluator.update(pred, target)
    assert evaluator.confusion_matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    metrics = evaluator.compute()
    # IoU: sky 1/(2+1-1) = 0.5, road 2/(2+4-2) = 0.5, car 0/(1+0-0) = 0, boat: empty union -> nan (excluded).
    assert metrics["IoU/sky"] == 0.5
    assert metrics["IoU/road"] == 0.5
    assert metrics["IoU/car"] == 0.0
    assert math.isnan(metrics["IoU/boat"])
    assert metrics["mIoU"] == pytest.approx(1 / 3)
    assert metrics["aAcc"] == pytest.approx(3 / 5)
    assert (metrics["Acc/sky"], metrics["Acc/road"], metrics["Acc/car"]) == (0.5, 1.0, 0.0)
    assert math.isnan(metrics["Acc/boat"])
    assert metrics["mAcc"] == pytest.approx(0.5)
    assert list(metrics)[:3] == ["mIoU", "aAcc", "mAcc"]


def test_class_only_predicted_counts_in_miou_but_not_macc() -> None:
    evaluator = SegmentationEvaluator(num_classes=2)
    evaluator.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    metrics = evaluator.compute()
    assert metrics["IoU/1"] == 0.0  # predicted, never in the target: a real 0 in the mean
    assert metrics["mIoU"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert math.isnan(metrics["Acc/1"])
    assert metrics["mAcc"] == 0.5


def _numpy_reference(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> dict[str, float]:
    pred = np.concatenate([p.ravel() for p in preds])
    target = np.concatenate([t.ravel() for t in targets])
    valid = target != 255
    ious, accs = [], []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        gt_count = np.sum((target == c) & valid)
        ious.append(inter / union if union else np.nan)
        accs.append(inter / gt_count if gt_count else np.nan)
    return {
        "mIoU": float(np.nanmean(ious)),
        "aAcc": float(np.sum((pred == target) & valid) / valid.sum()),
        "mAcc": float(np.nanmean(accs)),
        **{f"IoU/{c}": float(v) for c, v in enumerate(ious)},
    }


def test_matches_independent_numpy_computation_over_batches() -> None:
    rng = np.random.default_rng(0)
    num_classes = 7
    evaluator = SegmentationEvaluator(num_classes=num_classes)
    preds, targets = [], []
    for _ in range(4):
        target = rng.integers(0, num_classes - 1, size=(2, 9, 11))  # class 6 never in the target
        target[rng.random(target.shape) < 0.1] = 255
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, num_classes - 1, target.shape))
        pred = np.where(pred == 255, 0, pred)
        evaluator.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    metrics = evaluator.compute()
    for key, value in _numpy_reference(preds, targets, num_classes).items():
        if math.isnan(value):
            assert math.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert math.isnan(metrics["IoU/6"])


def test_single_image_equals_batch_of_one_and_reset() -> None:
    target = torch.tensor([[0, 1], [2, 2]])
    pred = torch.tensor([[0, 2], [2, 1]])
    single, batched = SegmentationEvaluator(3), SegmentationEvaluator(3)
    single.update(pred, target)
    batched.update(pred[None], target[None].to(torch.uint8))
    assert torch.equal(single.confusion_matrix, batched.confusion_matrix)
    single.reset()
    assert single.confusion_matrix.sum() == 0
    assert math.isnan(single.compute()["mIoU"])


def test_bad_input_raises() -> None:
    evaluator = SegmentationEvaluator(num_classes=3)
    with pytest.raises(
        ValueError, match=r"pred and target must both be \(B, H, W\) or \(H, W\), got \(2, 2\) and \(2, 3\)"
    ):
        evaluator.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must hold integer class ids \(argmax the logits first\)"):
        evaluator.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target holds labels \[3, 7\] outside 0\.\.2 \(ignore_index 255\)"):
        evaluator.update(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[3, 7, 255]]))
    with pytest.raises(ValueError, match=r"pred holds labels \[-1\] outside 0\.\.2"):
        evaluator.update(torch.tensor([[-1, 0]]), torch.tensor([[1, 0]]))
    assert evaluator.confusion_matrix.sum() == 0
    with pytest.raises(ValueError, match=r"ignore_index 2 collides with a class label \(num_classes=3\)"):
        SegmentationEvaluator(num_classes=3, ignore_index=2)
    with pytest.raises(ValueError, match=r"got 2 class_names for num_classes=3"):
        SegmentationEvaluator(num_classes=3, class_names=["a", "b"])
