"""Top-k classification accuracy, for one batch or streamed over a dataset (DDP-aware through torchmetrics)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = ["ClassificationEvaluator", "topk_accuracy"]


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` as a tuple of distinct positive ints."""
    values = tuple(int(k) for k in ks)
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"ks must be distinct positive ints, got {tuple(ks)}")
    return values


def _count_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Number of samples whose target is among the top ``min(k, C)`` scores, for each k.

    Args:
        logits: ``(B, C)`` float scores.
        target: ``(B,)`` integer class ids in ``0..C-1``.
        ks: Distinct positive ints.

    Returns:
        ``(len(ks),)`` int64 counts on the device of ``logits``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if target.shape != (logits.shape[0],) or target.is_floating_point():
        raise ValueError(
            f"target must be (B,) = ({logits.shape[0]},) integer class ids, got {target.dtype} {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    target = target.to(logits.device).long()
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target holds class ids outside 0..{num_classes - 1}")
    clipped = [min(k, num_classes) for k in ks]
    top = logits.topk(max(clipped), dim=1).indices  # (B, k_max), best first
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in clipped]).long()


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose target class is among the ``k`` highest logits.

    Args:
        logits: ``(B, C)`` scores (logits or probabilities), ``B >= 1``.
        target: ``(B,)`` int64 class ids in ``0..C-1``.
        ks: The k values; a k larger than ``C`` is clipped to ``C`` (accuracy 1.0), keeping its key.

    Returns:
        ``{k: accuracy}`` with accuracies in ``[0, 1]``. Ties between equal logits are broken by ``torch.topk``.

    Raises:
        ValueError: On bad shapes, an empty batch or out-of-range targets.
    """
    ks_tuple = _validate_ks(ks)
    if logits.ndim == 2 and logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    correct = _count_correct(logits, target, ks_tuple)
    return {k: float(count) / logits.shape[0] for k, count in zip(ks_tuple, correct.tolist(), strict=True)}


class ClassificationEvaluator(Metric):
    """Streams top-k accuracy: a torchmetrics ``Metric`` whose counts are summed over the processes in ``compute``.

    Args:
        ks: The k values (clipped to the number of classes per batch, as in ``topk_accuracy``).

    The counts live on the device of the latest ``update`` (the evaluator moves itself there), so that a NCCL process
    group can sum them.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    counts: torch.Tensor

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        super().__init__()
        self.ks = _validate_ks(ks)
        # Correct predictions per k, then the number of samples.
        self.add_state("counts", default=torch.zeros(len(self.ks) + 1, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits: ``(B, C)`` scores.
            target: ``(B,)`` int64 class ids.
        """
        correct = _count_correct(logits, target, self.ks)
        batch = torch.cat([correct, correct.new_tensor([logits.shape[0]])])
        if self.counts.device != batch.device:
            self.to(batch.device)
        self.counts += batch

    def compute(self) -> dict[str, float]:
        """Accuracy over everything seen (on all ranks).

        Returns:
            ``{"top<k>": accuracy}`` in ``[0, 1]``; ``nan`` (with a warning) when no sample was seen.
        """
        values = self.counts.detach().cpu().tolist()
        total = values[-1]
        if total == 0:
            warnings.warn(
                "ClassificationEvaluator.compute() called before any sample; accuracies are nan", stacklevel=2
            )
            return {f"top{k}": math.nan for k in self.ks}
        return {f"top{k}": correct / total for k, correct in zip(self.ks, values[:-1], strict=True)}
