"""Image classification on any registered backbone (visionkit or timm): cross-entropy, top-1 / top-5."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from visionkit.eval import ClassificationEvaluator
from visionkit.registry import create_model
from visionkit.tasks.base import BaseTask

__all__ = ["ClassificationTask"]

Batch = tuple[Tensor, dict[str, Any]]


class ClassificationTask(BaseTask):
    """Classification with a backbone from :func:`visionkit.create_model`.

    Batches are ``(images (B, 3, H, W) float, {"label": (B,) int64, ...})`` as produced by
    ``visionkit.data.collate_classification``. Logged: ``train/loss``, ``val/loss``, ``val/top1``, ``val/top5``
    (and ``test/...``); predictions are ``{"probs": (B, C), "label": (B,)}``.

    Args:
        backbone: Registered model name (``resnet18``, ``vit_tiny_patch16_224``, ``vmamba_tiny``, ...).
        num_classes: Number of classes of the classifier head.
        pretrained: Load the backbone's pretrained weights (from a local file; nothing is downloaded).
        checkpoint_path: Initial weights for the backbone (``.safetensors`` or a torch state dict file).
        backbone_kwargs: Extra keyword arguments of the model constructor (e.g. ``img_size``, ``drop_path_rate``).
        label_smoothing: Cross-entropy label smoothing.
        top_k: The k of the top-k accuracies logged.
        lr: Base learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        betas: AdamW betas.
    """

    monitor: ClassVar[str] = "val/top1"
    mode: ClassVar[str] = "max"

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 1000,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        top_k: tuple[int, ...] = (1, 5),
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__(
            lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, betas=betas
        )

    def configure_models(self) -> None:
        """Create the network, the loss and one evaluator per evaluation stage."""
        hp = self.hparams
        self.model = create_model(
            hp.backbone,
            pretrained=hp.pretrained,
            checkpoint_path=hp.checkpoint_path,
            num_classes=hp.num_classes,
            **(hp.backbone_kwargs or {}),
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        self.evaluators = {stage: ClassificationEvaluator(ks=tuple(hp.top_k)) for stage in ("val", "test")}

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, 3, H, W)``."""
        return self.model(images)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Cross-entropy on one batch."""
        images, targets = batch
        loss = self.criterion(self(images), targets["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _evaluation_step(self, batch: Batch, stage: str) -> None:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets["label"])
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=images.shape[0])
        self.evaluators[stage].update(logits.detach(), targets["label"])

    def _evaluation_epoch_end(self, stage: str) -> None:
        evaluator = self.evaluators[stage]
        metrics = evaluator.compute()  # already reduced over processes
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, prog_bar=True)
        evaluator.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and top-k counts for one validation batch."""
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and top-k counts for one test batch."""
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/top{k}`` for the whole validation set."""
        self._evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/top{k}`` for the whole test set."""
        self._evaluation_epoch_end("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Class probabilities and arg-max labels."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = torch.softmax(self(images).float(), dim=-1)
        return {"probs": probs, "label": probs.argmax(dim=-1)}
