from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visionkit.eval import ClassificationEvaluator, topk_accuracy

HAND_LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.3, 0.2, 0.0],  # target 1: rank 1
        [0.8, 0.1, 0.7, 0.0, 0.2],  # target 2: rank 2
        [0.2, 0.3, 0.1, 0.5, 0.4],  # target 0: rank 4
        [0.0, 0.1, 0.2, 0.3, 0.9],  # target 4: rank 1
    ]
)
HAND_TARGET = torch.tensor([1, 2, 0, 4])


def test_hand_worked_topk() -> None:
    assert topk_accuracy(HAND_LOGITS, HAND_TARGET, ks=(1, 2, 3, 5)) == {1: 0.5, 2: 0.75, 3: 0.75, 5: 1.0}


def test_k_larger_than_num_classes_is_clipped() -> None:
    assert topk_accuracy(HAND_LOGITS[:, :3], torch.tensor([1, 2, 0, 2]), ks=(1, 5)) == {1: 0.5, 5: 1.0}


def _numpy_topk(logits: np.ndarray, target: np.ndarray, k: int) -> float:
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.argmax(order == target[:, None], axis=1)
    return float(np.mean(rank < k))


def test_streaming_matches_numpy_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    evaluator = ClassificationEvaluator(ks=(1, 3, 5))
    all_logits, all_targets = [], []
    for batch in (5, 17, 1, 9):
        logits = torch.randn(batch, 10, generator=generator)
        target = torch.randint(0, 10, (batch,), generator=generator)
        evaluator.update(logits, target)
        all_logits.append(logits)
        all_targets.append(target)
    logits, target = torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy()
    metrics = evaluator.compute()
    assert list(metrics) == ["top1", "top3", "top5"]
    for k in (1, 3, 5):
        assert metrics[f"top{k}"] == pytest.approx(_numpy_topk(logits, target, k), abs=1e-12)
    evaluator.reset()
    with pytest.warns(UserWarning, match=r"called before any sample; accuracies are nan"):
        assert math.isnan(evaluator.compute()["top1"])


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"logits must be \(B, C\), got shape \(4,\)"):
        topk_accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must be \(B,\) = \(4,\) integer class ids"):
        topk_accuracy(HAND_LOGITS, torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"target holds class ids outside 0\.\.4"):
        topk_accuracy(HAND_LOGITS, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"topk_accuracy needs at least one sample"):
        topk_accuracy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ks must be distinct positive ints, got \(1, 0\)"):
        ClassificationEvaluator(ks=(1, 0))
