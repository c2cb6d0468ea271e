"""The base LightningModule of every visionkit task: hyper-parameters, optimiser and schedule.

Subclasses build their networks in ``configure_models`` and implement the step methods. ``visionkit.cli`` exposes
every subclass to YAML through ``model.class_path`` (LightningCLI subclass mode), so each ``__init__`` argument must be
a plain, typed value (no modules or callables): that also keeps ``.ckpt`` files loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from visionkit.tasks.optim import build_adamw, param_groups_weight_decay, warmup_cosine_factor

__all__ = ["BaseTask"]


class BaseTask(pl.LightningModule):
    """Base task: AdamW with decoupled weight decay, linear warm-up then cosine decay per optimiser step.

    Args:
        lr: Base learning rate.
        weight_decay: AdamW weight decay (biases, norms and tokens are not decayed).
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Learning rate at the last step, as a fraction of ``lr``.
        betas: AdamW betas.
    """

    #: Metric that a ``ModelCheckpoint``/``EarlyStopping`` configured for this task should watch, and its direction.
    monitor: ClassVar[str] = "val/loss"
    mode: ClassVar[str] = "min"
    #: ``__init__`` arguments that are not hyper-parameters (modules injected from YAML, for example).
    ignore: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.ignore))
        self.configure_models()

    def configure_models(self) -> None:
        """Build the networks of the task (called once from ``__init__``, after hyper-parameters are saved)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser; override for layer-wise learning rates.

        Returns:
            Groups with ``params``, ``weight_decay`` and ``lr_scale``.
        """
        return param_groups_weight_decay(self.named_parameters(), self.hparams.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW and a per-step warm-up + cosine ``LambdaLR`` spanning ``trainer.estimated_stepping_batches``.

        The number of steps is read at the first optimiser step, not here: asking for it in ``configure_optimizers``
        would make Lightning build the training iterator before a resumed run has restored its epoch counter, and the
        resumed epoch would then be shuffled (and its workers seeded) as epoch 0. The factor at step 0 does not
        depend on the total.
        """
        optimizer = build_adamw(self.parameter_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        warmup, min_ratio = int(self.hparams.warmup_steps), float(self.hparams.min_lr_ratio)
        total_steps: int | None = None

        def factor(step: int) -> float:
            nonlocal total_steps
            if total_steps is None:
                if step == 0:
                    return warmup_cosine_factor(0, 1, warmup, min_ratio)
                total_steps = int(self.trainer.estimated_stepping_batches)
            return warmup_cosine_factor(step, total_steps, warmup, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
