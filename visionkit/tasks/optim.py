"""Optimiser and learning-rate schedule shared by every task: AdamW, linear warm-up, cosine decay.

The schedule is a per-step multiplier on the base learning rate (``LambdaLR``), the convention of timm, MAE and
detectron2's ``WarmupCosineLR``: it rises linearly from ``warmup_start_ratio`` to 1 over the warm-up steps, then
follows a half cosine down to ``min_lr_ratio`` at the last step.

Weight decay follows timm's ``param_groups_weight_decay`` / ``param_groups_layer_decay``: 1-d tensors (biases, norm
weights) and what a model declares exempt are not decayed. A model declares that with ``no_weight_decay()`` (parameter
names relative to the module that declares them, fnmatch wildcards allowed: timm's convention),
``no_weight_decay_keywords()`` (substrings of those names: Swin's and VMamba's convention) or a ``_no_weight_decay``
attribute on the parameter (Mamba's). :func:`no_weight_decay_ids` resolves all three, for every submodule, to the
parameters themselves, so that a backbone nested anywhere inside a task is honoured whatever its prefix there.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Iterable

import torch
from torch import nn

__all__ = ["build_adamw", "no_weight_decay_ids", "param_groups_weight_decay", "warmup_cosine_factor"]


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


def no_weight_decay_ids(module: nn.Module) -> set[int]:
    """The parameters that ``module`` or any of its submodules exempts from weight decay, as ``id(parameter)``.

    Every submodule's own declarations are read relative to that submodule (a VMamba backbone's ``"masked_embed"`` is
    found whether the backbone is the module itself, ``task.backbone`` or ``task.model.backbone.body.backbone``):

    - ``no_weight_decay()``: names as in ``submodule.named_parameters()``, matched exactly or as fnmatch patterns
      (timm's ``create_optimizer_v2``); names of parameters that do not exist (ViT's ``dist_token`` without
      distillation) are ignored;
    - ``no_weight_decay_keywords()``: every parameter of the submodule whose relative name contains one of the
      strings (Swin, VMamba);
    - ``param._no_weight_decay = True`` on the parameter itself (Mamba's ``A_log`` / ``D``).

    Args:
        module: Any module, typically a whole task.

    Returns:
        ``id()`` of every exempt parameter (identity, so that the same tensor reached under another name matches).
    """
    exempt = {id(param) for param in module.parameters() if getattr(param, "_no_weight_decay", False)}
    for submodule in module.modules():
        names_fn = getattr(submodule, "no_weight_decay", None)
        keywords_fn = getattr(submodule, "no_weight_decay_keywords", None)
        names = set(names_fn()) if callable(names_fn) else set()
        keywords = tuple(keywords_fn()) if callable(keywords_fn) else ()
        if not names and not keywords:
            continue
        patterns = [name for name in names if any(char in name for char in "*?[")]
        for name, param in submodule.named_parameters():
            if (
                name in names
                or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
                or any(keyword in name for keyword in keywords)
            ):
                exempt.add(id(param))
    return exempt


def param_groups_weight_decay(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: float = 1.0,
    no_decay_ids: Collection[int] = (),
) -> list[dict]:
    """Split parameters into a decayed group and a non-decayed one (biases, norm weights, 1-d tensors, tokens).

    Not decayed: 1-d tensors, ``*.bias``, names containing ``pos_embed`` or ``token``, and the parameters whose
    ``id`` is in ``no_decay_ids`` (see :func:`no_weight_decay_ids`). Frozen parameters (``requires_grad=False``) are
    left out.

    Args:
        named_parameters: ``module.named_parameters()`` or a filtered subset of it.
        weight_decay: Decoupled weight decay of the decayed group.
        lr_scale: Multiplier stored as ``lr_scale`` in both groups (used by layer-wise decay and head learning rates).
        no_decay_ids: ``id()`` of further parameters that must not be decayed, whatever their shape and name.

    Returns:
        Up to two parameter-group dicts for ``torch.optim.AdamW``: the decayed one first.
    """
    exempt = set(no_decay_ids)
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        no_wd = (
            param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name or id(param) in exempt
        )
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
