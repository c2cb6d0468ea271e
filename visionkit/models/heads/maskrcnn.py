"""Mask R-CNN on any :class:`~visionkit.models.heads.pyramid.MultiScaleBackbone`, assembled from torchvision parts.

``build_maskrcnn`` puts torchvision's ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``: five levels, strides 4 to
64) on the backbone's four maps and hands the result to torchvision's ``MaskRCNN`` together with an
``AnchorGenerator`` (one anchor size per level) and, where the sizes differ from torchvision's defaults, smaller box
and mask heads. torchvision reserves label 0 for the background: :func:`to_maskrcnn_labels` and
:func:`from_maskrcnn_labels` convert visionkit's contiguous labels ``0..C-1`` to ``1..C`` and back.

:func:`maskrcnn_predict` runs inference and pastes boxes and masks straight into caller-given output sizes (the
original image sizes, when the data pipeline resized the images), which torchvision's ``forward`` cannot do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import FeaturePyramidNetwork, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from visionkit.models.heads.pyramid import MultiScaleBackbone
from visionkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DEFAULT_ANCHOR_SIZES",
    "DropLossRoIHeads",
    "FeaturePyramidBackbone",
    "build_maskrcnn",
    "enable_drop_loss",
    "from_maskrcnn_labels",
    "maskrcnn_predict",
    "to_maskrcnn_labels",
]

#: Anchor side (px, at the model's input scale) per FPN level (strides 4, 8, 16, 32, 64): torchvision's defaults.
DEFAULT_ANCHOR_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512)


class FeaturePyramidBackbone(nn.Module):
    """A :class:`MultiScaleBackbone` followed by an FPN: the ``backbone`` torchvision's detection models expect.

    Args:
        body: The multi-scale backbone (strides 4, 8, 16, 32).
        out_channels: FPN channels.
        norm_layer: Normalisation after each FPN convolution (``None``: none, torchvision's default).

    Attributes:
        out_channels: Channels of every returned level (read by torchvision's ``MaskRCNN``).
    """

    def __init__(
        self, body: MultiScaleBackbone, out_channels: int = 256, norm_layer: Callable[[int], nn.Module] | None = None
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.channels), out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """FPN levels of ``x`` ``(B, 3, H, W)``: keys ``"0"``..``"3"`` (strides 4..32) and ``"pool"`` (stride 64)."""
        features = self.body(x)
        return self.fpn(OrderedDict((str(level), feature) for level, feature in enumerate(features)))


def _anchor_sizes(sizes: Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    levels = tuple(tuple(int(s) for s in size) if isinstance(size, Sequence) else (int(size),) for size in sizes)
    if len(levels) != 5:
        raise ValueError(f"anchor_sizes needs one entry per FPN level (5: strides 4 to 64), got {len(levels)}")
    return levels


def build_maskrcnn(
    body: MultiScaleBackbone,
    num_classes: int,
    *,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | Sequence[Sequence[int]] = DEFAULT_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    representation_size: int = 1024,
    mask_head_channels: Sequence[int] = (256, 256, 256, 256),
    box_head_convs: int = 0,
    norm: str | None = None,
    **maskrcnn_kwargs: Any,
) -> MaskRCNN:
    """Assemble a torchvision ``MaskRCNN`` on ``body`` + FPN.

    Args:
        body: Multi-scale backbone (see :func:`~visionkit.models.heads.pyramid.build_multiscale_backbone`).
        num_classes: Foreground classes ``C`` (the model predicts ``C + 1`` with background 0).
        fpn_channels: FPN (and RPN / RoI head input) channels.
        anchor_sizes: Anchor side per FPN level in input pixels, 5 entries (an int or a list of ints each).
        aspect_ratios: Anchor height / width ratios, shared by every level.
        min_size: Short side that torchvision's transform resizes images to.
        max_size: Upper bound on the long side after that resize.
        image_mean: Per-channel mean subtracted from the ``[0, 1]`` images.
        image_std: Per-channel standard deviation they are divided by.
        representation_size: Width of the box head's two fully connected layers (torchvision: 1024).
        mask_head_channels: Channels of the mask head's 3x3 convolutions (torchvision: four of 256).
        box_head_convs: 0: torchvision's box head (two fully connected layers of ``representation_size``); ``n > 0``:
            ``n`` 3x3 convolutions of ``fpn_channels`` then one fully connected layer (torchvision's
            ``FastRCNNConvFCHead``, the "4conv1fc" head of Mask R-CNN v2 when ``n = 4``).
        norm: ``"batch"`` puts BatchNorm after every FPN, box-head and mask-head convolution (what training from
            scratch needs, He et al. 2019, "Rethinking ImageNet Pre-training"); ``None``: no normalisation.
        **maskrcnn_kwargs: Other ``torchvision.models.detection.MaskRCNN`` arguments (``rpn_batch_size_per_image``,
            ``box_batch_size_per_image``, ``box_detections_per_img``, ``box_score_thresh``, ...).

    Returns:
        The model; ``model.backbone`` is a :class:`FeaturePyramidBackbone` whose ``body.backbone`` is the original
        backbone module.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if norm not in (None, "batch"):
        raise ValueError(f"norm must be None or 'batch', got {norm!r}")
    norm_layer = nn.BatchNorm2d if norm == "batch" else None
    backbone = FeaturePyramidBackbone(body, fpn_channels, norm_layer)
    sizes = _anchor_sizes(anchor_sizes)
    anchor_generator = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(sizes))
    resolution = 7  # torchvision's MultiScaleRoIAlign output size for boxes
    mask_channels = list(mask_head_channels)
    if box_head_convs > 0:
        box_head: nn.Module = FastRCNNConvFCHead(
            (fpn_channels, resolution, resolution), [fpn_channels] * box_head_convs, [representation_size], norm_layer
        )
    else:
        box_head = TwoMLPHead(fpn_channels * resolution**2, representation_size)
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=anchor_generator,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, mask_channels, 1, norm_layer=norm_layer),
        mask_predictor=MaskRCNNPredictor(mask_channels[-1], mask_channels[-1], num_classes + 1),
        **maskrcnn_kwargs,
    )


class DropLossRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with CutLER's DropLoss on the box classification loss.

    After torchvision samples the training proposals, each one whose largest IoU with the image's ground-truth boxes
    is at most ``drop_iou_thresh`` gets the label -100, which ``F.cross_entropy`` (inside torchvision's
    ``fastrcnn_loss``) ignores; box regression and mask losses only use positive proposals, so they are unchanged. An
    image without ground truth keeps torchvision's behaviour (all its proposals are background): dropping them all
    would leave a batch of such images with no classification loss term at all (NaN). Build it from an existing
    model with :func:`enable_drop_loss`.
    """

    drop_iou_thresh: float = 0.01  # CutLER's τ (cutler/modeling/roi_heads, configs: ROI_HEADS.USE_DROPLOSS)

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Sample like torchvision, then mark dropped proposals marked with label -100 (see the class docstring)."""
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        assert targets is not None  # super() raised otherwise
        for i, (boxes, target) in enumerate(zip(proposals, targets, strict=True)):
            gt = target["boxes"].to(boxes.dtype)
            if gt.numel() == 0:
                continue
            max_iou = box_iou(boxes, gt).max(dim=1).values
            labels[i] = torch.where(max_iou > self.drop_iou_thresh, labels[i], torch.full_like(labels[i], -100))
        return proposals, matched_idxs, labels, regression_targets


def enable_drop_loss(model: MaskRCNN, iou_thresh: float = 0.01) -> MaskRCNN:
    """Switch ``model``'s RoI heads to :class:`DropLossRoIHeads` in place (same modules and weights).

    Args:
        model: A torchvision ``MaskRCNN`` (or Faster R-CNN) whose ``roi_heads`` is a plain ``RoIHeads``.
        iou_thresh: Proposals with max IoU to the ground truth at or below this get no classification loss
            (CutLER: 0.01).

    Returns:
        ``model``.
    """
    if not 0.0 <= iou_thresh < 1.0:
        raise ValueError(f"iou_thresh must be in [0, 1), got {iou_thresh}")
    if type(model.roi_heads) not in (RoIHeads, DropLossRoIHeads):
        raise TypeError(f"enable_drop_loss needs torchvision RoIHeads, got {type(model.roi_heads).__name__}")
    # RoIHeads takes a dozen constructor arguments that MaskRCNN already resolved; swapping the class keeps the
    # configured modules and buffers exactly and only changes how training samples are labelled
    model.roi_heads.__class__ = DropLossRoIHeads
    model.roi_heads.drop_iou_thresh = iou_thresh
    return model


def to_maskrcnn_labels(labels: Tensor) -> Tensor:
    """Contiguous labels ``0..C-1`` → torchvision detection labels ``1..C`` (0 is the background)."""
    return labels + 1


def from_maskrcnn_labels(labels: Tensor) -> Tensor:
    """Labels of torchvision detection models ``1..C`` → contiguous labels ``0..C-1``."""
    return labels - 1


@torch.no_grad()
def maskrcnn_predict(
    model: MaskRCNN, images: Sequence[Tensor], output_sizes: Sequence[tuple[int, int]] | None = None
) -> list[dict[str, Tensor]]:
    """Detections of an eval-mode ``MaskRCNN``, with boxes and masks pasted at ``output_sizes``.

    torchvision's ``forward`` pastes at the size of the images it was given; when the data pipeline resized them,
    pasting the 28x28 mask logits once, directly at the original size, is both cheaper and sharper than resizing
    full-size masks afterwards.

    Args:
        model: The model, in eval mode.
        images: Images ``(3, H_i, W_i)`` float in ``[0, 1]``.
        output_sizes: ``(height, width)`` to paste each image's detections at; ``None`` uses the input sizes.

    Returns:
        One dict per image: ``boxes`` ``(K, 4)`` float xyxy in output pixels, ``scores`` ``(K,)``, ``labels``
        ``(K,)`` int64 in torchvision's ``1..C`` numbering, ``masks`` ``(K, 1, H_out, W_out)`` float probabilities.
    """
    if model.training:
        raise RuntimeError("maskrcnn_predict needs the model in eval mode (call model.eval())")
    input_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    sizes = input_sizes if output_sizes is None else [(int(h), int(w)) for h, w in output_sizes]
    if len(sizes) != len(images):
        raise ValueError(f"got {len(sizes)} output sizes for {len(images)} images")
    batch, _ = model.transform(list(images))
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return model.transform.postprocess(detections, batch.image_sizes, sizes)
