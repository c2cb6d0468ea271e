"""build_maskrcnn: torchvision Mask R-CNN on a MultiScaleBackbone; label mapping; pasting at output sizes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead

from visionkit.models.heads.maskrcnn import (
    FeaturePyramidBackbone,
    build_maskrcnn,
    from_maskrcnn_labels,
    maskrcnn_predict,
    to_maskrcnn_labels,
)
from visionkit.models.heads.pyramid import build_multiscale_backbone

SMALL = {
    "fpn_channels": 16,
    "representation_size": 32,
    "mask_head_channels": [16],
    "min_size": 64,
    "max_size": 96,
    "anchor_sizes": [8, 16, 32, 64, 128],
}


def _model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    body = build_multiscale_backbone(timm.create_model("resnet18"))
    return build_maskrcnn(body, num_classes=3, **{**SMALL, **kwargs})


def _target() -> dict[str, torch.Tensor]:
    masks = torch.zeros(2, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 35:60, 45:75] = 1
    boxes = torch.tensor([[10.0, 10.0, 40.0, 30.0], [45.0, 35.0, 75.0, 60.0]])
    return {"boxes": boxes, "labels": to_maskrcnn_labels(torch.tensor([0, 2])), "masks": masks}


def test_label_mapping_round_trip():
    labels = torch.tensor([0, 1, 2, 0])
    assert to_maskrcnn_labels(labels).tolist() == [1, 2, 3, 1]  # 0 is torchvision's background
    assert torch.equal(from_maskrcnn_labels(to_maskrcnn_labels(labels)), labels)


def test_assembly_fpn_anchors_and_heads():
    model = _model()
    assert isinstance(model.backbone, FeaturePyramidBackbone) and model.backbone.out_channels == 16
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert isinstance(model.roi_heads.box_head, TwoMLPHead)
    features = model.backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    normed = _model(norm="batch", box_head_convs=2)
    assert isinstance(normed.roi_heads.box_head, FastRCNNConvFCHead)
    assert any(isinstance(m, nn.BatchNorm2d) for m in normed.backbone.fpn.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in normed.roi_heads.mask_head.modules())


def test_training_losses_and_gradients():
    model = _model(rpn_batch_size_per_image=32, box_batch_size_per_image=16).train()
    losses = model([torch.rand(3, 64, 80)], [_target()])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    stem = model.backbone.body.backbone.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_predict_pastes_boxes_and_masks_at_the_output_size():
    model = _model(box_score_thresh=0.0).eval()
    image = torch.rand(3, 64, 80)
    at_input = maskrcnn_predict(model, [image])[0]
    at_double = maskrcnn_predict(model, [image], [(128, 160)])[0]
    assert len(at_input["boxes"]) > 0
    assert at_input["masks"].shape[-2:] == (64, 80) and at_double["masks"].shape[-2:] == (128, 160)
    torch.testing.assert_close(at_double["boxes"], 2 * at_input["boxes"])
    assert torch.equal(at_double["labels"], at_input["labels"]) and at_input["labels"].min() >= 1
    with pytest.raises(RuntimeError, match="eval mode"):
        maskrcnn_predict(model.train(), [image])


def test_argument_errors():
    with pytest.raises(ValueError, match="one entry per FPN level"):
        _model(anchor_sizes=[16, 32, 64])
    with pytest.raises(ValueError, match="norm must be"):
        _model(norm="group")
    with pytest.raises(ValueError, match="num_classes"):
        build_maskrcnn(build_multiscale_backbone(timm.create_model("resnet18")), 0)


def test_drop_loss_ignores_proposals_that_overlap_no_ground_truth():
    from torchvision.ops import box_iou

    from visionkit.models.heads.maskrcnn import DropLossRoIHeads, enable_drop_loss

    model = _model()
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 64, 80, dtype=torch.uint8),
    }
    proposals = [
        torch.tensor(
            [
                [12.0, 11.0, 38.0, 29.0],  # on the object: foreground
                [30.0, 20.0, 60.0, 40.0],  # touches it (0.01 < IoU < 0.5): background, kept
                [70.0, 45.0, 90.0, 60.0],  # far from it (IoU 0): dropped
                [0.0, 50.0, 8.0, 60.0],  # far: dropped
            ]
        )
    ]
    plain = model.roi_heads
    torch.manual_seed(0)
    _, _, plain_labels, _ = plain.select_training_samples([p.clone() for p in proposals], [target])
    enable_drop_loss(model, 0.01)
    assert isinstance(model.roi_heads, DropLossRoIHeads) and model.roi_heads is plain  # same module, new class
    torch.manual_seed(0)
    sampled, _, labels, _ = model.roi_heads.select_training_samples([p.clone() for p in proposals], [target])
    iou = box_iou(sampled[0], target["boxes"]).max(dim=1).values
    expected = torch.where(iou > 0.01, plain_labels[0], torch.full_like(plain_labels[0], -100))
    assert torch.equal(labels[0], expected)
    assert (labels[0] == -100).sum() == 2  # the two far proposals
    assert (labels[0] == 1).any() and (labels[0] == 0).any()

    # an image without ground truth keeps plain labels (all background), so the loss never becomes NaN
    torch.manual_seed(0)
    _, _, empty_labels, _ = model.roi_heads.select_training_samples(
        [proposals[0].clone()],
        [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 80)}],
    )
    assert (empty_labels[0] == 0).all()


def test_drop_loss_training_step_is_finite_and_validates():
    from visionkit.models.heads.maskrcnn import enable_drop_loss

    model = enable_drop_loss(_model(), 0.01).train()
    image = torch.rand(3, 64, 80)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 64, 80, dtype=torch.uint8),
    }
    losses = model([image, image], [_target(), empty])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match="iou_thresh"):
        enable_drop_loss(_model(), 1.5)
