"""Image classification on any backbone (a visionkit or timm model name, or an injected module): cross-entropy, top-k.

The network is ``self.backbone`` (timm's contract) up to its pooled pre-logits features,
``backbone.forward_head(backbone.forward_features(x), pre_logits=True)`` of shape ``(B, D)``, then ``self.head``, a
:class:`~visionkit.models.heads.classification.ClassificationHead`. ``head="linear"`` starts from the backbone's own
(timm) classifier: its weights are copied into the head when it is a ``Linear(D, num_classes)`` (so a pretrained
ImageNet classifier is kept when ``num_classes`` matches), then the backbone's classifier is removed
(``reset_classifier(0)``). Keeping the classifier outside the backbone lets ``freeze_backbone=True`` train it alone
(linear probing). ``head="mlp"`` puts a hidden layer (``head_hidden_dim``, GELU, dropout) before it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from visionkit.eval import ClassificationEvaluator
from visionkit.models.heads.classification import ClassificationHead
from visionkit.tasks.backbone import load_checkpoint_into
from visionkit.tasks.base import BaseTask

__all__ = ["ClassificationTask"]

Batch = tuple[Tensor, dict[str, Any]]

#: Methods a classification backbone needs (timm's model contract).
BACKBONE_CONTRACT: tuple[str, ...] = ("forward_features", "forward_head", "reset_classifier")


class ClassificationTask(BaseTask):
    """Classification with a backbone from :func:`visionkit.create_model` or injected from YAML.

    Batches are ``(images (B, 3, H, W) float, {"label": (B,) int64, ...})`` as produced by
    ``visionkit.data.collate_classification``. Logged: ``train/loss``, ``val/loss``, ``val/top1``, ``val/top5``
    (and ``test/...``); predictions are ``{"probs": (B, C), "label": (B,)}``. State-dict keys are ``backbone.*``
    and ``head.*``.

    Args:
        backbone: Registered model name (``resnet18``, ``vit_tiny_patch16_224``, ``vmamba_tiny``, ...) or a module
            that follows timm's contract (``forward_features``, ``forward_head(x, pre_logits=True)``,
            ``reset_classifier``, ``num_features``); an injected module's classifier is removed in place.
        num_classes: Number of classes.
        pretrained: Load the backbone's pretrained weights (from a local file; nothing is downloaded).
        checkpoint_path: Initial weights for the backbone (``.safetensors`` or a torch state dict file).
        backbone_kwargs: Extra keyword arguments of the model constructor (e.g. ``img_size``, ``drop_path_rate``);
            only for a backbone given by name.
        head: ``"linear"`` (one linear layer, initialised from the backbone's classifier) or ``"mlp"``.
        head_hidden_dim: Hidden width of the MLP head; ``None`` uses the feature dimension ``D``.
        head_dropout: Dropout before the head's last linear layer.
        label_smoothing: Cross-entropy label smoothing.
        top_k: The k of the top-k accuracies logged.
        lr: Base learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        betas: AdamW betas.
        layer_decay: Layer-wise learning-rate decay of the backbone (ViT fine-tuning); the head has scale 1.
        freeze_backbone: Train the head only (linear probing); the backbone stays in eval mode.
        init_checkpoint: Initial weights of the whole task (backbone and head: its ``state_dict``, e.g. a model cut out
            of a multi-task run by ``tools/extract_task_model.py``); read with the safe loader, loaded strictly. Unlike
            ``--ckpt_path`` it starts a new run.
    """

    monitor: ClassVar[str] = "val/top1"
    mode: ClassVar[str] = "max"

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 1000,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        head: Literal["linear", "mlp"] = "linear",
        head_hidden_dim: int | None = None,
        head_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        top_k: tuple[int, ...] = (1, 5),
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            betas=betas,
            layer_decay=layer_decay,
            freeze_backbone=freeze_backbone,
        )

    def configure_models(self) -> None:
        """Create the backbone, the head, the loss and one evaluator per evaluation stage."""
        hp = self.hparams
        if hp.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {hp.head!r}.")
        backbone = self.build_backbone(num_classes=hp.num_classes)
        missing = [name for name in BACKBONE_CONTRACT if not callable(getattr(backbone, name, None))]
        if missing or not hasattr(backbone, "num_features"):
            raise TypeError(
                f"ClassificationTask needs a backbone with timm's contract; {type(backbone).__qualname__} lacks "
                f"{', '.join(missing) or 'num_features'}. Use a timm/visionkit model (by name or class_path)."
            )
        in_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.head = ClassificationHead(
            in_features,
            hp.num_classes,
            hidden_dim=(hp.head_hidden_dim or in_features) if hp.head == "mlp" else None,
            dropout=hp.head_dropout,
        )
        classifier = backbone.get_classifier() if callable(getattr(backbone, "get_classifier", None)) else None
        copy_classifier = (
            hp.head == "linear"
            and isinstance(classifier, nn.Linear)
            and classifier.weight.shape == self.head.fc.weight.shape
            and classifier.bias is not None
        )
        if copy_classifier:
            with torch.no_grad():
                self.head.fc.weight.copy_(classifier.weight)
                self.head.fc.bias.copy_(classifier.bias)
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        self.evaluators = {stage: ClassificationEvaluator(ks=tuple(hp.top_k)) for stage in ("val", "test")}
        if hp.init_checkpoint is not None:
            load_checkpoint_into(self, hp.init_checkpoint, f"this {type(self).__name__}")

    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled pre-logits features ``(B, D)`` of the backbone for images ``(B, 3, H, W)``."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, 3, H, W)``."""
        return self.head(self.forward_features(images))

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
