"""Instance segmentation (Mask R-CNN) on any backbone: training losses, COCO box / mask AP, COCO results JSON, PNGs.

The network is torchvision's ``MaskRCNN`` assembled by :func:`~visionkit.models.heads.maskrcnn.build_maskrcnn` on the
backbone's four feature maps (:func:`~visionkit.models.heads.pyramid.build_multiscale_backbone`: hierarchical models
through their stages, single-scale ViTs through a ViTDet simple feature pyramid). Batches come from
``COCODataModule`` (``collate_detection``): a list of float ``[0, 1]`` images, possibly resized by the datamodule,
and targets with ``boxes``, ``labels`` (contiguous ``0..C-1``), ``masks``, ``image_id`` and ``orig_size``.
torchvision normalises the images itself (``image_mean``/``image_std``: ImageNet's) and resizes them to
``min_size``/``max_size``; its labels are ``1..C`` (0 is the background), converted both ways here.

Evaluation pastes every detection's box and mask at the image's ``orig_size`` and scores them against the
datamodule's ground-truth JSON through :class:`~visionkit.tasks.coco_evaluation.COCOEvaluationMixin` (a
:class:`~visionkit.eval.COCOEvaluator` built lazily, once per split; the segm size split follows ``coco_segm_area``).
Logged: ``train/loss`` and each ``train/loss_<part>``; ``val/bbox_AP``, ``val/segm_AP50``, ... (the 12 COCO stats of
both IoU types), ``val/<type>_AP/<class>`` (and ``test/...``). The COCO tables are printed on rank 0, and a PNG of the
predictions on the first ``num_vis_images`` validation images is written after every validation.
``predict`` writes the COCO result records to ``predictions_path``, the file ``tools/eval.py coco --results`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionkit.models.heads.maskrcnn import (
    DEFAULT_ANCHOR_SIZES,
    build_maskrcnn,
    enable_drop_loss,
    from_maskrcnn_labels,
    maskrcnn_predict,
    to_maskrcnn_labels,
)
from visionkit.models.heads.pyramid import build_multiscale_backbone
from visionkit.tasks.backbone import load_checkpoint_into
from visionkit.tasks.base import BaseTask
from visionkit.tasks.coco_evaluation import COCOEvaluationMixin
from visionkit.utils import IMAGENET_MEAN, IMAGENET_STD
from visionkit.viz import image_grid, overlay_instances, save_png
from visionkit.weights import DEFAULT_STRIP_PREFIXES

__all__ = ["InstanceSegmentationTask"]

Batch = tuple[list[Tensor], list[dict[str, Any]]]


class InstanceSegmentationTask(COCOEvaluationMixin, BaseTask):
    """Mask R-CNN with an FPN on a backbone from :func:`visionkit.create_model` or injected from YAML.

    Args:
        backbone: Registered model name (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``, ...) or a
            timm-contract module (``feature_info`` + ``forward_intermediates``).
        num_classes: Foreground classes ``C`` (contiguous labels ``0..C-1``).
        pretrained: Load the backbone's pretrained weights (local files only).
        checkpoint_path: Initial backbone weights (``.safetensors`` or a torch state dict).
        backbone_kwargs: Extra model-constructor arguments for a backbone given by name (e.g. ``img_size``,
            ``dynamic_img_size`` for ViTs, ``drop_path_rate``).
        min_size: Short side (px) that torchvision's transform resizes images to.
        max_size: Upper bound (px) on the long side after that resize.
        fpn_channels: FPN channels (also the RPN and RoI heads' input).
        anchor_sizes: Anchor side (px at the model's input scale) per FPN level, strides 4, 8, 16, 32, 64.
        aspect_ratios: Anchor height / width ratios.
        representation_size: Width of the box head's two fully connected layers.
        mask_head_channels: Channels of the mask head's 3x3 convolutions (one entry per layer).
        box_head_convs: 0: torchvision's two-FC box head; ``n > 0``: ``n`` 3x3 convolutions then one FC layer.
        norm: ``"batch"``: BatchNorm in the FPN, the box-head convolutions and the mask head (helps training from
            scratch); ``None``: none (torchvision's default).
        box_detections_per_img: Most detections kept per image.
        box_score_thresh: Detections scoring below this are dropped.
        mask_threshold: Mask probabilities above this are foreground.
        init_checkpoint: Initial weights of the whole detector (backbone, FPN, heads), e.g. the ``last.ckpt`` of the
            previous self-training round or a state dict saved from ``task.model``; read with the safe loader,
            ``model.`` prefixes stripped, loaded strictly. Unlike ``--ckpt_path`` it starts a new run (fresh
            optimiser, epoch 0).
        drop_loss_iou: CutLER's DropLoss for training on pseudo-labels: sampled proposals whose max IoU with the
            ground truth is at most this get no classification loss (CutLER: 0.01); ``None``: off (the usual loss).
        maskrcnn_kwargs: Other ``torchvision.models.detection.MaskRCNN`` arguments (``rpn_batch_size_per_image``,
            ``box_batch_size_per_image``, ``rpn_pre_nms_top_n_train``, ...).
        predictions_path: Where ``predict`` writes the COCO results JSON; ``None``:
            ``<trainer.default_root_dir>/predictions.json``.
        coco_segm_area: The area that splits segm AP / AR into small / medium / large: ``"mask"`` (detectron2,
            default) or ``"box"`` (pycocotools' ``loadRes`` with boxes, mmdet); named in the printed tables.
        num_vis_images: Validation images drawn into ``val_predictions_epoch{N}.png`` (0 disables it).
        vis_score_thresh: Detections drawn in that PNG score at least this.
        lr: Base learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        betas: AdamW betas.
        layer_decay: Layer-wise learning-rate decay of the backbone (ViT fine-tuning).
        freeze_backbone: Keep the backbone fixed (no gradients, eval mode).
    """

    monitor: ClassVar[str] = "val/segm_AP"
    mode: ClassVar[str] = "max"

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 80,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        anchor_sizes: list[int] = list(DEFAULT_ANCHOR_SIZES),  # noqa: B006 - a plain default, never mutated
        aspect_ratios: list[float] = [0.5, 1.0, 2.0],  # noqa: B006
        representation_size: int = 1024,
        mask_head_channels: list[int] = [256, 256, 256, 256],  # noqa: B006
        box_head_convs: int = 0,
        norm: Literal["batch"] | None = None,
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        mask_threshold: float = 0.5,
        init_checkpoint: str | None = None,
        drop_loss_iou: float | None = None,
        maskrcnn_kwargs: dict[str, Any] | None = None,
        predictions_path: str | None = None,
        coco_segm_area: Literal["mask", "box"] = "mask",
        num_vis_images: int = 8,
        vis_score_thresh: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
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
        """Create the backbone, its multi-scale wrapper and the Mask R-CNN around it."""
        hp = self.hparams
        if not 0.0 <= hp.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must be in [0, 1], got {hp.mask_threshold}")
        # No classifier: the dense heads never use one, and a backbone-only checkpoint (a pretraining export) loads.
        backbone = self.build_backbone(num_classes=0)
        self.model = build_maskrcnn(
            build_multiscale_backbone(backbone),
            hp.num_classes,
            fpn_channels=hp.fpn_channels,
            anchor_sizes=list(hp.anchor_sizes),
            aspect_ratios=list(hp.aspect_ratios),
            min_size=hp.min_size,
            max_size=hp.max_size,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            representation_size=hp.representation_size,
            mask_head_channels=list(hp.mask_head_channels),
            box_head_convs=hp.box_head_convs,
            norm=hp.norm,
            box_detections_per_img=hp.box_detections_per_img,
            box_score_thresh=hp.box_score_thresh,
            **dict(hp.maskrcnn_kwargs or {}),
        )
        if hp.drop_loss_iou is not None:
            enable_drop_loss(self.model, hp.drop_loss_iou)
        if hp.init_checkpoint is not None:
            load_checkpoint_into(self.model, hp.init_checkpoint, "this Mask R-CNN", ("model.", *DEFAULT_STRIP_PREFIXES))
        self.init_coco_evaluation()
        self._vis_samples: list[tuple[Tensor, dict[str, Tensor]]] = []

    @property
    def backbone(self) -> nn.Module:
        """The backbone module (inside ``self.model``; a property so that its weights are stored once)."""
        return self.model.backbone.body.backbone

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------

    def forward(self, images: list[Tensor], orig_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        """Detections for ``images`` (list of ``(3, H, W)`` float in ``[0, 1]``), in eval mode.

        Args:
            images: The images.
            orig_sizes: ``(height, width)`` to paste each image's detections at; ``None``: the input sizes.

        Returns:
            One dict per image: ``boxes`` ``(K, 4)`` xyxy float, ``scores`` ``(K,)``, ``labels`` ``(K,)`` contiguous,
            ``masks`` ``(K, H, W)`` bool (binarised at ``mask_threshold``).
        """
        detections = maskrcnn_predict(self.model, images, orig_sizes)
        threshold = float(self.hparams.mask_threshold)
        return [
            {
                "boxes": d["boxes"],
                "scores": d["scores"],
                "labels": from_maskrcnn_labels(d["labels"]),
                "masks": d["masks"][:, 0] > threshold,
            }
            for d in detections
        ]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Sum of the Mask R-CNN losses; each part is logged as ``train/<part>``."""
        images, targets = batch
        model_targets = [
            {
                "boxes": target["boxes"],
                "labels": to_maskrcnn_labels(target["labels"]),
                "masks": target["masks"].to(torch.uint8),
            }
            for target in targets
        ]
        losses = self.model(images, model_targets)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation (COCOEvaluationMixin) and the validation PNG
    # ------------------------------------------------------------------------------------------------------------

    def coco_batch_predictions(self, batch: Batch) -> tuple[list[dict[str, Tensor]], list[int]]:
        """Detections of one batch pasted at each image's ``orig_size``, and the images' COCO ids."""
        images, targets = batch
        orig_sizes = [tuple(int(v) for v in target["orig_size"]) for target in targets]
        return self(images, orig_sizes), [int(target["image_id"]) for target in targets]

    def on_validation_epoch_start(self) -> None:
        """Build (once) or reset the validation COCO evaluator."""
        super().on_validation_epoch_start()
        self._vis_samples = []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Predict one batch at original image size, hand it to the evaluator, keep the first images for the PNG."""
        predictions = self.coco_evaluation_step(batch, "val")
        if not self.trainer.is_global_zero:
            return
        images, targets = batch
        for image, target, prediction in zip(images, targets, predictions, strict=True):
            if len(self._vis_samples) >= self.hparams.num_vis_images:
                break
            size = tuple(int(v) for v in target["orig_size"])
            resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            self._vis_samples.append((resized.cpu(), {k: v.cpu() for k, v in prediction.items()}))

    def on_validation_epoch_end(self) -> None:
        """Log the COCO metrics, print the tables and write the predictions PNG (rank 0)."""
        if self.end_coco_evaluation("val") is not None:
            # trainer.log_dir broadcasts from rank 0, so every rank must ask for it (asking on rank 0 alone hangs DDP).
            output_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            if self.trainer.is_global_zero and self._vis_samples:
                self._save_visualisation(output_dir)
        self._vis_samples = []

    def _save_visualisation(self, output_dir: Path) -> Path:
        names = list(getattr(self.coco_dataset("val"), "class_names", []) or []) or None
        threshold = float(self.hparams.vis_score_thresh)
        panels = []
        for image, prediction in self._vis_samples:
            keep = prediction["scores"] >= threshold
            panels.append(
                overlay_instances(
                    image,
                    masks=prediction["masks"][keep],
                    boxes=prediction["boxes"][keep],
                    labels=prediction["labels"][keep],
                    scores=prediction["scores"][keep],
                    class_names=names,
                )
            )
        return save_png(
            image_grid(panels), output_dir / f"{self._png_prefix()}val_predictions_epoch{self.current_epoch}.png"
        )

    def _png_prefix(self) -> str:
        return f"{self.task_scope}_" if self.task_scope else ""
