"""Training callbacks of Mod-Squad: expert-usage monitoring (``docs/methods/modsquad.md`` §4) and router-only tuning.

:class:`ExpertUsageCallback` reads the usage EMA of every MoE layer's :class:`RoutingStats` (attached to the model by
:func:`attach_routing_stats`), logs each task's usage entropy (mean over layers) and writes one heat map per layer:
rows = tasks, columns = experts, colour = the task's share of its routed slots (viridis, scaled per row to its
maximum so that a task's preferred experts stand out whatever its spread). :func:`topk_overlap` compares tasks' expert
sets. :class:`RouterTuning` freezes everything but routers, norms and heads before training (§6).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor, nn

from visionkit.methods.modsquad.extraction import freeze_for_router_tuning
from visionkit.methods.modsquad.routing_stats import RoutingStats, find_routing_stats
from visionkit.viz import colorize, save_png, with_caption

__all__ = ["ExpertUsageCallback", "RouterTuning", "topk_overlap", "usage_entropy", "usage_heatmap"]


def usage_entropy(usage_percent: Tensor) -> Tensor:
    """Entropy (nats) of each task's expert-usage distribution.

    Args:
        usage_percent: ``(T, E)`` usage per task in % (rows of unseen tasks are 0).

    Returns:
        ``(T,)``: ``−Σ_e p log p`` with ``p = usage / 100``; ``log E`` for uniform use, 0 for a single expert, NaN for
        an unseen task.
    """
    p = usage_percent.float() / 100.0
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
    return torch.where(usage_percent.sum(dim=1) > 0, entropy, torch.full_like(entropy, float("nan")))


def topk_overlap(usage_percent: Tensor, k: int) -> Tensor:
    """Jaccard overlap of the tasks' ``k`` most used experts: 1 = the same experts, 0 = disjoint sets.

    Args:
        usage_percent: ``(T, E)`` usage per task (any non-negative scale).
        k: Experts per set (the layer's top-k).

    Returns:
        ``(T, T)`` float, ``|A_s ∩ A_t| / |A_s ∪ A_t|`` (1 on the diagonal).
    """
    top = torch.zeros_like(usage_percent, dtype=torch.bool)
    top.scatter_(1, usage_percent.topk(min(k, usage_percent.shape[1]), dim=1).indices, True)
    top = top.float()
    inter = top @ top.T
    union = top.sum(1, keepdim=True) + top.sum(1) - inter
    return inter / union.clamp_min(1.0)


def usage_heatmap(usage_percent: Tensor, title: str = "", cell: int = 12) -> Image.Image:
    """A tasks × experts heat map of usage, each row scaled to its maximum, with an optional caption above.

    Args:
        usage_percent: ``(T, E)`` usage in %.
        title: Caption text (e.g. the layer path and the task names).
        cell: Pixels per cell.

    Returns:
        RGB image of ``(T·cell, E·cell)`` pixels plus the caption band.
    """
    values = usage_percent.detach().float().cpu()
    scaled = values / values.amax(dim=1, keepdim=True).clamp_min(1e-12)
    pixels = np.repeat(np.repeat(colorize(scaled.numpy()), cell, axis=0), cell, axis=1)
    image = Image.fromarray(pixels)
    return with_caption(image, title) if title else image


def _task_names(module: nn.Module, num_tasks: int) -> list[str]:
    for sub in module.modules():
        names = getattr(sub, "task_names", None)
        if names is not None and len(names) == num_tasks:
            return [str(name) for name in names]
    return [str(t) for t in range(num_tasks)]


class ExpertUsageCallback(pl.Callback):
    """Log per-task usage entropy and save per-layer usage heat maps every ``every_n_epochs`` training epochs.

    Logged (identical on every rank with synchronised statistics): ``expert_usage/entropy/<task>``, the mean over
    layers of the task's usage entropy in nats. Files (global rank 0): ``<out_dir>/epoch_<e>/<layer>.png``.

    Args:
        every_n_epochs: Period in training epochs.
        out_dir: Folder of the heat maps; ``None``: ``<trainer.log_dir or default_root_dir>/expert_usage``.
        cell: Pixels per heat-map cell.
    """

    def __init__(self, every_n_epochs: int = 1, out_dir: str | Path | None = None, cell: int = 12) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs, self.out_dir, self.cell = every_n_epochs, out_dir, cell

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "expert_usage"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the entropies and, on rank 0, write the heat maps of the finished epoch."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        stats: dict[str, RoutingStats] = find_routing_stats(pl_module)
        if not stats:
            return
        usage = {path: s.usage_percent() for path, s in stats.items()}
        num_tasks = next(iter(usage.values())).shape[0]
        names = _task_names(pl_module, num_tasks)
        entropies = torch.stack([usage_entropy(u) for u in usage.values() if u.shape[0] == num_tasks]).cpu()
        for task, name in enumerate(names):
            column = entropies[:, task]
            column = column[~column.isnan()]
            if column.numel():
                pl_module.log(f"expert_usage/entropy/{name}", column.mean().item(), on_epoch=True, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        folder = self._folder(trainer) / f"epoch_{trainer.current_epoch:03d}"
        for path, values in usage.items():
            layer_names = _task_names(pl_module, values.shape[0])
            entropy = usage_entropy(values)
            title = f"{path} (max H = {math.log(values.shape[1]):.2f})\n" + ", ".join(
                f"{n}: H={h:.2f}" for n, h in zip(layer_names, entropy.tolist(), strict=True)
            )
            filename = re.sub(r"[^A-Za-z0-9_.-]", "_", path or "model") + ".png"
            save_png(usage_heatmap(values, title, self.cell), folder / filename)


class RouterTuning(pl.Callback):
    """Router-only tuning as a training option: before the optimiser is built, freeze all but routers, norms, heads.

    ``trainer.callbacks: [{class_path: visionkit.methods.modsquad.RouterTuning}]`` on the config of an extracted task
    model (``tools/extract_task_model.py``) trains only the parameters whose dotted name contains one of ``train``
    (:func:`~visionkit.methods.modsquad.freeze_for_router_tuning`; the release's ``main_pru_tuning.py``). visionkit
    tasks leave frozen parameters out of the optimiser.

    Args:
        train: Substrings of the parameter names that stay trainable (routers ``f_gate``, norms, task heads).
    """

    def __init__(self, train: list[str] = ["f_gate", "norm", "head"]) -> None:  # noqa: B006 - never mutated
        if not train:
            raise ValueError("RouterTuning needs at least one name fragment to train")
        self.train = list(train)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Freeze for ``fit`` (Lightning calls ``setup`` before ``configure_optimizers``)."""
        if stage != "fit":
            return
        trainable = freeze_for_router_tuning(pl_module, self.train)
        if not trainable:
            raise ValueError(f"RouterTuning: no parameter name of {type(pl_module).__name__} contains {self.train}")
        total = sum(p.numel() for p in pl_module.parameters())
        kept = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        rank_zero_info(f"RouterTuning: training {len(trainable)} tensors, {kept:,} of {total:,} parameters")
