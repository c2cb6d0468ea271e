"""Per-step schedules and gradient rules of OpenUS's training loop (inherited from the DINO / iBOT code base).

- :func:`cosine_schedule_at`: the value of iBOT's ``utils.cosine_scheduler`` array at one optimiser step (learning
  rate 5e-4 → 1e-6 after a 10-epoch linear warm-up from 0; weight decay 0.04 → 0.4; teacher momentum 0.996 → 1),
  computed for the step instead of materialised for the whole run, so that a resumed run needs nothing but its step.
- :func:`clip_gradients_per_parameter`: iBOT's ``utils.clip_gradients``: *each* parameter's gradient is scaled to an
  L2 norm of at most ``max_norm`` (not one global norm as ``torch.nn.utils.clip_grad_norm_``).
- :func:`update_teacher`: the EMA teacher ``θ_t ← m θ_t + (1 − m) θ_s`` over the parameters the two share by name.

Sources: DINO / iBOT ``utils.py`` (``cosine_scheduler``, ``clip_gradients``, ``cancel_gradients_last_layer``), which
OpenUS's ``utils.py`` keeps; values in docs/methods/openus.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["clip_gradients_per_parameter", "cosine_schedule_at", "update_teacher"]


def cosine_schedule_at(
    step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """The value at ``step`` of iBOT's ``cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs)``.

    The released array is ``linspace(warmup_start, base, warmup_steps)`` (both ends included) followed by
    ``final + (base − final)(1 + cos(π i / n)) / 2`` for ``i = 0 .. n − 1``, ``n = total_steps − warmup_steps``.
    Steps past the end keep the last value.

    Args:
        step: 0-based optimiser step.
        total_steps: Steps of the whole run (``epochs × steps per epoch``).
        base: Value after the warm-up (the peak).
        final: Value the cosine approaches at the end.
        warmup_steps: Steps of linear warm-up (0: none).
        warmup_start: First value of the warm-up.

    Returns:
        The scheduled value.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    step = min(max(int(step), 0), total_steps - 1)
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(base)
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    length = total_steps - warmup_steps
    index = step - warmup_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * index / length))


def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor | None:
    """Scale every gradient whose L2 norm exceeds ``max_norm`` down to ``max_norm`` (each parameter on its own).

    The factor is ``max_norm / (‖g‖ + 1e-6)``, applied when below 1 (iBOT's ``clip_gradients``).

    Args:
        parameters: Parameters whose ``.grad`` to clip in place (those without a gradient are skipped).
        max_norm: The per-parameter bound.

    Returns:
        The norms before clipping, ``(P,)``, or None when no parameter has a gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2).to(torch.float32) for g in grads])
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad, factor in zip(grads, factors, strict=True):
        grad.mul_(factor.to(grad.dtype))
    return norms


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← momentum · teacher + (1 − momentum) · student`` over the parameters both have under one name.

    The student has parameters the teacher lacks (the pixel decoder, a separate patch last layer); they are skipped,
    as the release's update over common names does. Buffers are not averaged.

    Args:
        teacher: The EMA network (its parameters are updated in place).
        student: The trained network.
        momentum: ``m`` in ``[0, 1]``.
    """
    student_params = dict(student.named_parameters())
    pairs = [(t, student_params[name]) for name, t in teacher.named_parameters() if name in student_params]
    if not pairs:
        raise ValueError("teacher and student share no parameter names; cannot update the teacher")
    teacher_tensors = [t for t, _ in pairs]
    student_tensors = [s.detach() for _, s in pairs]
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)
