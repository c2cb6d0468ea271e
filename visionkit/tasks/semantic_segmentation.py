"""Semantic segmentation on any backbone: multi-scale features, an UperNet head, whole or sliding-window inference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from visionkit.eval import SegmentationEvaluator
from visionkit.models.heads.pyramid import MultiScaleBackbone, build_multiscale_backbone
from visionkit.models.heads.upernet import UperNet
from visionkit.tasks.backbone import load_checkpoint_into
from visionkit.tasks.base import BaseTask
from visionkit.utils.constants import IGNORE_INDEX

__all__ = ["SemanticSegmentationTask", "sliding_window_logits"]

Batch = tuple[Tensor, dict[str, Any]]


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (mmseg's ``slide_inference`` grid).

    ``ceil((length - crop) / stride) + 1`` windows ``stride`` apart; the last one is moved back so that it ends at the
    border. An axis shorter than the window gets a single window at 0 (padded by the caller).
    """
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def sliding_window_logits(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> Tensor:
    """Logits of one image from overlapping windows, averaged where they overlap (mmseg ``mode='slide'``).

    Windows of ``crop_size`` are placed ``stride`` apart, the last one of each row/column shifted back to end at the
    image border; along an axis shorter than the window, the window is the whole axis zero-padded (0 is the mean
    colour after normalisation) to ``crop_size`` and its logits are cropped back. All windows of the image go through
    ``predict`` as one batch. Each pixel's logits are the sum over the windows that cover it divided by their count.

    Args:
        predict: Maps windows ``(N, 3, crop_h, crop_w)`` to logits ``(N, num_classes, crop_h, crop_w)``.
        image: One image ``(3, H, W)`` (normalised float, without batch padding).
        num_classes: Number of classes ``C``.
        crop_size: Window ``(crop_h, crop_w)`` in pixels.
        stride: Window step ``(stride_h, stride_w)`` in pixels; ``stride <= crop_size`` so windows cover the image.

    Returns:
        ``(C, H, W)`` float32 logits.

    Raises:
        ValueError: On a stride larger than the window or non-positive sizes.
    """
    crop_h, crop_w = (int(v) for v in crop_size)
    stride_h, stride_w = (int(v) for v in stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1 or stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"sliding window needs 1 <= stride <= crop_size, got crop_size={tuple(crop_size)}, stride={tuple(stride)}"
        )
    height, width = image.shape[-2:]
    boxes = [
        (top, left, min(top + crop_h, height), min(left + crop_w, width))
        for top in _window_starts(height, crop_h, stride_h)
        for left in _window_starts(width, crop_w, stride_w)
    ]
    windows = image.new_zeros((len(boxes), image.shape[0], crop_h, crop_w))
    for index, (top, left, bottom, right) in enumerate(boxes):
        windows[index, :, : bottom - top, : right - left] = image[:, top:bottom, left:right]
    window_logits = predict(windows).float()
    logits = window_logits.new_zeros((num_classes, height, width))
    count = window_logits.new_zeros((1, height, width))
    for window, (top, left, bottom, right) in zip(window_logits, boxes, strict=True):
        logits[:, top:bottom, left:right] += window[:, : bottom - top, : right - left]
        count[:, top:bottom, left:right] += 1
    return logits / count


class SemanticSegmentationTask(BaseTask):
    """Semantic segmentation: a backbone's 4-level feature pyramid and an :class:`~visionkit.models.heads.UperNet`.

    Any backbone that :func:`~visionkit.models.heads.pyramid.build_multiscale_backbone` accepts works: hierarchical
    models (``resnet18``, ``convnext_atto``, ...) give their stride 4-32 stages; plain ViTs (``vit_tiny_patch16_224``,
    ``vit_base_patch16_224``) go through a ViTDet simple feature pyramid (whose layers train with the head, also under
    ``freeze_backbone``). ``self.backbone`` is the timm model itself, so ``layer_decay`` and ``freeze_backbone`` act on
    it only.

    Batches are those of :class:`~visionkit.data.ADE20KDataModule` (``collate_segmentation``): images ``(B, 3, H, W)``
    normalised float and padded bottom/right to a multiple of 32, and a target dict with ``mask`` ``(B, H, W)`` int64
    (255 on ignored and padded pixels), ``image_size`` (each sample's unpadded ``(H_i, W_i)``), ``orig_size``.

    Training loss: cross-entropy (``ignore_index``) of the head's stride-4 logits upsampled bilinearly to the input
    size, plus ``aux_weight`` times that of an auxiliary FCN head on the stride-16 map (mmseg's 0.4). Logged:
    ``train/loss``, ``train/loss_decode``, ``train/loss_aux``.

    Evaluation: ``inference_mode="whole"`` runs the padded batch once; ``"slide"`` runs
    :func:`sliding_window_logits` on each image's unpadded region (``slide_crop_size`` windows every
    ``slide_stride`` pixels, averaged). Logits are cropped to ``image_size`` per sample; a
    :class:`~visionkit.eval.SegmentationEvaluator` sums one confusion matrix over the whole set. Logged per stage
    (``val``/``test``): ``loss``, ``mIoU``, ``aAcc``, ``mAcc``, ``mDice`` and, with ``foreground_index`` (binary
    foreground / background sets: lesion segmentation), ``IoU_fg`` and ``Dice_fg`` (fractions in [0, 1]).

    Resolution: the metric is computed at the evaluation pipeline's resolution (image and label map resized together
    to short side ``short_side`` = 512, the label with nearest neighbour), not at the original resolution as mmseg
    does (mmseg resizes the logits back to the original image size and compares them with the original label map).
    The numbers are close but not identical to mmseg's; state which protocol you report.

    Prediction (``predict_step``): one int64 label map per image, at ``orig_size`` (logits resized bilinearly before
    the argmax, mmseg's convention) when the batch has it, else at ``image_size``.

    Args:
        backbone: Registered model name (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``, ...) or a module.
        num_classes: Number of classes (150 for ADE20K with ``reduce_zero_label``).
        pretrained: Load the backbone's pretrained weights (local files only).
        checkpoint_path: Initial backbone weights (``.safetensors`` or a torch state-dict file).
        backbone_kwargs: Extra keyword arguments of the backbone constructor (e.g. ``img_size``, ``drop_path_rate``).
        decode_channels: Width of the UperNet convs (mmseg: 512; 768 in its MAE / BEiT configs).
        aux_channels: Width of the auxiliary FCN head's hidden conv (mmseg: 256).
        aux_weight: Weight of the auxiliary head's loss; 0 builds no auxiliary head.
        ignore_index: Label of pixels left out of the loss and the metric.
        foreground_index: The foreground class of a binary set (lesion vs background): adds ``IoU_fg`` and
            ``Dice_fg`` of that class to the metrics; None for multi-class sets.
        inference_mode: ``"whole"`` or ``"slide"`` evaluation.
        slide_crop_size: Sliding-window ``(height, width)`` in pixels (mmseg's ``test_cfg.crop_size``; named apart
            from the datamodule's training ``crop_size``, since Lightning merges both sets of hyper-parameters).
        slide_stride: Sliding-window step ``(height, width)`` in pixels (mmseg's ``test_cfg.stride``).
        lr: Base learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        betas: AdamW betas.
        layer_decay: Layer-wise learning-rate decay of the backbone (ViTs; ``None`` disables).
        freeze_backbone: Keep the backbone frozen and in eval mode (train the pyramid neck and the head only).
        init_checkpoint: Initial weights of the whole task (backbone and head: its ``state_dict``, e.g. a model cut out
            of a multi-task run by ``tools/extract_task_model.py``); read with the safe loader, loaded strictly. Unlike
            ``--ckpt_path`` it starts a new run.
    """

    monitor: ClassVar[str] = "val/mIoU"
    mode: ClassVar[str] = "max"

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 150,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        decode_channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        ignore_index: int = IGNORE_INDEX,
        foreground_index: int | None = None,
        inference_mode: Literal["whole", "slide"] = "whole",
        slide_crop_size: tuple[int, int] = (512, 512),
        slide_stride: tuple[int, int] = (341, 341),
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
        init_checkpoint: str | None = None,
    ) -> None:
        if inference_mode not in ("whole", "slide"):
            raise ValueError(f"inference_mode must be 'whole' or 'slide', got {inference_mode!r}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
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
        """Create the backbone, its multi-scale pyramid, the UperNet head and the evaluators."""
        hp = self.hparams
        # No classifier: the dense heads never use one, and a backbone-only checkpoint (a pretraining export) loads.
        model = self.build_backbone(num_classes=0)
        self.pyramid: MultiScaleBackbone = build_multiscale_backbone(model)
        self.decode_head = UperNet(
            self.pyramid.channels,
            hp.num_classes,
            channels=hp.decode_channels,
            aux_channels=hp.aux_channels if hp.aux_weight > 0 else None,
        )
        self.evaluators = {
            stage: SegmentationEvaluator(
                hp.num_classes, ignore_index=hp.ignore_index, foreground_index=hp.foreground_index
            )
            for stage in ("val", "test")
        }
        if hp.init_checkpoint is not None:
            load_checkpoint_into(self, hp.init_checkpoint, f"this {type(self).__name__}")

    @property
    def backbone(self) -> nn.Module:
        """The timm-contract backbone inside the pyramid (what ``layer_decay`` and ``freeze_backbone`` act on)."""
        return self.pyramid.backbone

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, C, H, W)`` at the input resolution for normalised images ``(B, 3, H, W)``."""
        logits = self.decode_head(self.pyramid(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def _upsampled(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def segmentation_loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Cross-entropy of logits upsampled to the label size, averaged over the pixels that are not ignored.

        Args:
            logits: ``(B, C, h, w)`` float logits at any resolution (bilinearly resized to ``(H, W)``).
            masks: ``(B, H, W)`` int64 labels, ``ignore_index`` on ignored and padded pixels.

        Returns:
            Scalar loss: the sum over valid pixels divided by their number (PyTorch's ``ignore_index`` mean), and 0
            (with a zero gradient, not ``nan``) for a batch without a single valid pixel, e.g. a crop of ADE20K's
            "other" only.
        """
        logits = self._upsampled(logits, masks.shape[-2:])
        total = F.cross_entropy(logits, masks, ignore_index=self.hparams.ignore_index, reduction="sum")
        valid = (masks != self.hparams.ignore_index).sum()
        return total / valid.clamp(min=1)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Decode-head (+ weighted auxiliary) cross-entropy on one batch."""
        images, targets = batch
        masks = targets["mask"]
        features = self.pyramid(images)
        loss_decode = self.segmentation_loss(self.decode_head(features), masks)
        loss = loss_decode
        batch_size = images.shape[0]
        if self.decode_head.aux_head is not None:
            loss_aux = self.segmentation_loss(self.decode_head.forward_aux(features), masks)
            loss = loss_decode + self.hparams.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, batch_size=batch_size)
        self.log("train/loss_decode", loss_decode, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _sample_regions(self, images: Tensor, targets: dict[str, Any]) -> list[tuple[int, int]]:
        """Each sample's unpadded ``(H_i, W_i)`` (the whole batch size when ``image_size`` is absent)."""
        sizes = targets.get("image_size") if isinstance(targets, dict) else None
        if sizes is None:
            return [tuple(images.shape[-2:])] * images.shape[0]
        return [(int(h), int(w)) for h, w in sizes]

    def inference_logits(self, images: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per-sample logits ``(C, H_i, W_i)`` cropped to the unpadded sizes, by ``inference_mode``.

        Args:
            images: Padded batch ``(B, 3, H, W)``.
            sizes: Each sample's unpadded ``(H_i, W_i)``.

        Returns:
            One float logits tensor per sample.
        """
        hp = self.hparams
        if hp.inference_mode == "whole":
            logits = self(images)
            return [logits[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        return [
            sliding_window_logits(self, images[i, :, :h, :w], hp.num_classes, hp.slide_crop_size, hp.slide_stride)
            for i, (h, w) in enumerate(sizes)
        ]

    def _evaluation_step(self, batch: Batch, stage: str) -> None:
        images, targets = batch
        masks = targets["mask"]
        sizes = self._sample_regions(images, targets)
        per_sample = self.inference_logits(images, sizes)
        loss_sum, pixels = images.new_zeros(()), 0
        for logits, (h, w), mask in zip(per_sample, sizes, masks, strict=True):
            target = mask[:h, :w]
            valid = int((target != self.hparams.ignore_index).sum())
            if valid:
                loss_sum = loss_sum + F.cross_entropy(
                    logits[None], target[None], ignore_index=self.hparams.ignore_index, reduction="sum"
                )
                pixels += valid
            self.evaluators[stage].update(logits.argmax(dim=0), target)
        if pixels:  # mean over the valid pixels of the batch, as the training loss
            self.log(f"{stage}/loss", loss_sum / pixels, sync_dist=True, batch_size=images.shape[0])

    def _evaluation_epoch_end(self, stage: str) -> None:
        evaluator = self.evaluators[stage]
        metrics = evaluator.compute()  # reduced over processes
        names = ("mIoU", "aAcc", "mAcc", "mDice", "IoU_fg", "Dice_fg")
        self.log_dict({f"{stage}/{name}": metrics[name] for name in names if name in metrics}, prog_bar=True)
        evaluator.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and confusion-matrix update for one validation batch."""
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss and confusion-matrix update for one test batch."""
        self._evaluation_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        """Start a new confusion matrix (a sanity-check run must not leak into the first epoch)."""
        self.evaluators["val"].reset()

    def on_test_epoch_start(self) -> None:
        """Start a new confusion matrix."""
        self.evaluators["test"].reset()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/mIoU``, ``val/aAcc`` and ``val/mAcc`` of the whole validation set."""
        self._evaluation_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/mIoU``, ``test/aAcc`` and ``test/mAcc`` of the whole test set."""
        self._evaluation_epoch_end("test")

    def predict_step(self, batch: Batch | Tensor, batch_idx: int) -> dict[str, Any]:
        """Per-image label maps.

        Returns:
            ``{"label_maps": [int64 (H_i, W_i)], "image_id": [...]}``: maps at ``orig_size`` when the batch carries
            it (logits resized bilinearly before the argmax), otherwise at the unpadded ``image_size``.
        """
        images, targets = (batch if isinstance(batch, (tuple, list)) else (batch, {}))[:2]
        per_sample = self.inference_logits(images, self._sample_regions(images, targets))
        orig_sizes = targets.get("orig_size") or [None] * len(per_sample)
        label_maps = []
        for logits, orig in zip(per_sample, orig_sizes, strict=True):
            if orig is not None and tuple(orig) != tuple(logits.shape[-2:]):
                logits = self._upsampled(logits[None], orig)[0]
            label_maps.append(logits.argmax(dim=0))
        return {"label_maps": label_maps, "image_id": targets.get("image_id", list(range(len(label_maps))))}
