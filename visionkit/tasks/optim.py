"""Optimiser and learning-rate schedule shared by every task: AdamW, linear warm-up, cosine decay.

The schedule is a per-step multiplier on the base learning rate (``LambdaLR``), the convention of timm, MAE and
detectron2's ``WarmupCosineLR``: it rises linearly from ``warmup_start_ratio`` to 1 over the warm-up steps, then
follows a half cosine down to ``min_lr_ratio`` at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["build_adamw", "param_groups_weight_decay", "warmup_cosine_factor"]


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0, warmup_start_ratio: float = 0.001
) -> float:
    """Learning-rate multiplier at a step of a linear warm-up + cosine schedule.

    Args:
        step: Optimiser step index, 0-based.
        total_steps: Number of optimiser steps of the whole run (>= 1).
        warmup_steps: Steps of linear warm-up (0 disables it).
        min_lr_ratio: Multiplier reached at the last step.
        warmup_start_ratio: Multiplier at step 0 when warming up.

    Returns:
        The multiplier in ``[min(min_lr_ratio, warmup_start_ratio), 1]``.
    """
    total_steps = max(int(total_steps), 1)
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * alpha
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups_weight_decay(
    named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: float = 1.0
) -> list[dict]:
    """Split parameters into a decayed group and a non-decayed one (biases, norm weights, 1-d tensors, tokens).

    Frozen parameters (``requires_grad=False``) are left out.

    Args:
        named_parameters: ``module.named_parameters()`` or a filtered subset of it.
        weight_decay: Decoupled weight decay of the decayed group.
        lr_scale: Multiplier stored as ``lr_scale`` in both groups (used by layer-wise decay and head learning rates).

    Returns:
        Up to two parameter-group dicts for ``torch.optim.AdamW``.
    """
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        no_wd = param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name
        (no_decay if no_wd else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    return groups


def build_adamw(
    param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over parameter groups whose ``lr_scale`` (default 1) multiplies the base learning rate.

    Args:
        param_groups: Groups as returned by :func:`param_groups_weight_decay`.
        lr: Base learning rate.
        betas: Adam betas.
        eps: Adam epsilon.

    Returns:
        The optimiser; each group's ``lr`` is ``lr * lr_scale``.
    """
    if not param_groups:
        raise ValueError("No trainable parameters: every parameter has requires_grad=False.")
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)
