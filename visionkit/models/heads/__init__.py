"""Heads: multi-scale feature pyramids, Mask R-CNN assembly, UperNet and classification heads (plain nn.Modules)."""

from visionkit.models.heads.classification import ClassificationHead
from visionkit.models.heads.maskrcnn import (
    DEFAULT_ANCHOR_SIZES,
    DropLossRoIHeads,
    FeaturePyramidBackbone,
    build_maskrcnn,
    enable_drop_loss,
    from_maskrcnn_labels,
    maskrcnn_predict,
    to_maskrcnn_labels,
)
from visionkit.models.heads.pyramid import (
    PYRAMID_STRIDES,
    MultiScaleBackbone,
    SimpleFeaturePyramid,
    build_multiscale_backbone,
)
from visionkit.models.heads.upernet import FCNHead, PyramidPoolingModule, UperNet

__all__ = [
    "DEFAULT_ANCHOR_SIZES",
    "PYRAMID_STRIDES",
    "ClassificationHead",
    "DropLossRoIHeads",
    "FCNHead",
    "FeaturePyramidBackbone",
    "MultiScaleBackbone",
    "PyramidPoolingModule",
    "SimpleFeaturePyramid",
    "UperNet",
    "build_maskrcnn",
    "build_multiscale_backbone",
    "enable_drop_loss",
    "from_maskrcnn_labels",
    "maskrcnn_predict",
    "to_maskrcnn_labels",
]
