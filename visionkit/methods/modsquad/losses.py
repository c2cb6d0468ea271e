"""Mod-Squad's auxiliary routing losses and task-loss weighting (``docs/methods/modsquad.md`` §3).

Every formula, including where each ``1e-4`` sits, follows the official release (``UMass-Foundation-Model/Mod-Squad``
at ``1d17e81``, ``parallel_linear/parallel_experts/moe.py``: ``TaskMoE.get_aux_loss_and_clear`` and
``update_aux_statistics``; ``util/AutomaticWeightedLoss.py``). These are pure functions of accumulated statistics;
:class:`visionkit.methods.modsquad.RoutingStats` accumulates the statistics over a window (and across ranks) and calls
them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UncertaintyWeighting", "mutual_information_loss", "switch_loss", "z_loss"]


def mutual_information_loss(prob_sums: Tensor, num_tokens: Tensor | float, eps: float = 1e-4) -> Tensor:
    """Negative mutual information between tasks and experts, exactly as released.

    With ``S = prob_sums`` and ``N = num_tokens``::

        P(t, e) = S[t, e] / (N + eps)
        P(t)    = Σ_e P(t, e) + eps
        P(e)    = Σ_t P(t, e) + eps
        L       = −Σ_{t,e} P(t, e) · log(P(t, e) / P(t) / P(e) + eps)

    Minimising ``L`` maximises MI(T; E) = H(E) − H(E | T): balanced overall expert use, each task concentrated on few
    experts. A table with one task (or one non-empty row) gives ``P(t) ≈ 1`` and ``L ≈ 0`` (no signal).

    Args:
        prob_sums: ``(T, E)`` sums over the window's tokens of each task of the router probabilities
            (``softmax + 1e-4``, all ``E`` experts, not only the top-k); differentiable.
        num_tokens: Routed tokens in the window over all tasks (released: ``Σ_e count[e] / k``).
        eps: The release's ``1e-4``, used in all four places.

    Returns:
        Scalar loss (the release weights it by ``w_MI = 0.005`` per MoE layer).

    Raises:
        ValueError: ``prob_sums`` is not 2-D.
    """
    if prob_sums.ndim != 2:
        raise ValueError(f"prob_sums must have shape (T, E), got {tuple(prob_sums.shape)}")
    joint = prob_sums / (num_tokens + eps)
    p_task = joint.sum(dim=1, keepdim=True) + eps
    p_expert = joint.sum(dim=0, keepdim=True) + eps
    return -(joint * torch.log(joint / p_task / p_expert + eps)).sum()


def switch_loss(prob_sums: Tensor, counts: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss as released: ``E · Σ_e norm₁(prob_sums)_e · norm₁(counts)_e``.

    Args:
        prob_sums: ``(E,)`` router probabilities summed over the window's tokens (all tasks); differentiable.
        counts: ``(E,)`` tokens routed to each expert (top-k membership) over the window; no gradient flows.

    Returns:
        Scalar, 1 for perfectly uniform use.
    """
    num_experts = prob_sums.shape[-1]
    probs = F.normalize(prob_sums, p=1, dim=0)
    freq = F.normalize(counts.to(prob_sums.dtype), p=1, dim=0)
    return (probs * freq).sum() * num_experts


def z_loss(logits: Tensor, eps: float = 1e-4, reduction: str = "mean") -> Tensor:
    """Router z-loss as released in ``TaskMoE``: ``(log(Σ_e exp(logit_e) + eps))²`` per token.

    Computed as ``logaddexp(logsumexp(logits), log eps)``, the same value without overflow for large logits.

    Args:
        logits: ``(N, E)`` router logits (after noise when noisy gating is on, as released).
        eps: The release's ``1e-4`` inside the log.
        reduction: ``"mean"`` (the loss), ``"sum"`` (for accumulating over a window) or ``"none"`` (``(N,)``).

    Returns:
        Scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        ValueError: Unknown ``reduction``.
    """
    log_eps = torch.full((), math.log(eps), dtype=logits.dtype, device=logits.device)
    per_token = torch.logaddexp(torch.logsumexp(logits, dim=-1), log_eps) ** 2
    if reduction == "mean":
        return per_token.mean()
    if reduction == "sum":
        return per_token.sum()
    if reduction == "none":
        return per_token
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class UncertaintyWeighting(nn.Module):
    """Learned task-loss weights (Kendall et al.), as the release's ``AutomaticWeightedLoss``.

    ``L = Σ_i 0.5 / s_i² · L_i + log(1 + s_i²)`` with one learnable ``s_i`` per task, initialised to 1. The parameter
    is named ``params`` as released. Add it to the optimiser (no weight decay).

    Args:
        num_tasks: Number of task losses.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.params = nn.Parameter(torch.ones(num_tasks))

    def forward(self, losses: Sequence[Tensor] | Tensor, tasks: Sequence[int] | None = None) -> Tensor:
        """Weighted sum of the task losses.

        Args:
            losses: Scalar losses (a sequence or a 1-D tensor), one per entry of ``tasks``.
            tasks: The task index of each loss (a step that trains some of the tasks); ``None``: all ``num_tasks``
                tasks, in order.

        Returns:
            Scalar total (the terms of the tasks given).

        Raises:
            ValueError: The number of losses differs from the number of tasks.
        """
        values = torch.stack(list(losses)) if not isinstance(losses, Tensor) else losses.reshape(-1)
        params = self.params if tasks is None else self.params[list(tasks)]
        if values.numel() != params.numel():
            raise ValueError(f"expected {params.numel()} task losses, got {values.numel()}")
        squared = params**2
        return (0.5 / squared * values + torch.log1p(squared)).sum()
