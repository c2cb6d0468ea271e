"""MultiScaleBackbone / build_multiscale_backbone: strides 4-32 from hierarchical models, features_only and ViTs."""

from __future__ import annotations

from typing import ClassVar

import pytest
import timm
import torch
from torch import nn

from visionkit.models.heads.pyramid import MultiScaleBackbone, SimpleFeaturePyramid, build_multiscale_backbone

INPUT_HW = (128, 160)


def _run(pyramid: MultiScaleBackbone) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return pyramid(torch.randn(2, 3, *INPUT_HW))


@pytest.mark.parametrize(
    ("name", "kwargs", "mode", "channels"),
    [
        ("resnet18", {}, "intermediates", [64, 128, 256, 512]),
        ("convnext_atto", {}, "intermediates", [40, 80, 160, 320]),
        ("resnet18", {"features_only": True}, "features_only", [64, 128, 256, 512]),
        ("vit_tiny_patch16_224", {}, "vit", [48, 96, 192, 192]),
        ("vit_tiny_patch16_224", {"img_size": 64, "dynamic_img_size": True}, "vit", [48, 96, 192, 192]),
    ],
)
def test_four_maps_at_strides_4_to_32_and_gradients_reach_every_parameter(name, kwargs, mode, channels):
    pyramid = build_multiscale_backbone(timm.create_model(name, **kwargs))
    assert pyramid.mode == mode
    assert pyramid.channels == channels and pyramid.strides == [4, 8, 16, 32]
    outputs = _run(pyramid)
    height, width = INPUT_HW
    assert [tuple(o.shape) for o in outputs] == [
        (2, c, height // s, width // s) for c, s in zip(channels, [4, 8, 16, 32], strict=True)
    ]
    sum(o.square().mean() for o in outputs).backward()
    no_grad = [n for n, p in pyramid.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # the classifier head was pruned, so nothing is left without a gradient


def test_hierarchical_maps_equal_the_backbone_stages():
    backbone = timm.create_model("resnet18").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = backbone.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        got = build_multiscale_backbone(backbone)(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_vit_built_for_224_is_switched_to_dynamic_image_size():
    vit = timm.create_model("vit_tiny_patch16_224")
    assert not vit.dynamic_img_size
    pyramid = build_multiscale_backbone(vit)
    assert vit.dynamic_img_size and pyramid.backbone is vit
    assert [tuple(o.shape[-2:]) for o in pyramid(torch.randn(1, 3, 96, 64))] == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_simple_feature_pyramid_shapes_and_channel_check():
    sfp = SimpleFeaturePyramid(32)
    x = torch.randn(1, 32, 5, 7)
    assert [tuple(o.shape) for o in sfp(x)] == [(1, 8, 20, 28), (1, 16, 10, 14), (1, 32, 5, 7), (1, 32, 2, 3)]
    assert sfp(x)[2] is x  # the stride-16 level is the ViT map itself
    with pytest.raises(ValueError, match="divisible by 4"):
        SimpleFeaturePyramid(30)


def test_embed_dim_out_projects_every_level():
    pyramid = build_multiscale_backbone(timm.create_model("resnet18"), embed_dim_out=32)
    assert pyramid.channels == [32, 32, 32, 32]
    assert [o.shape[1] for o in _run(pyramid)] == [32, 32, 32, 32]


class _NoStride4(nn.Module):
    feature_info: ClassVar[list[dict[str, int]]] = [
        {"num_chs": 8, "reduction": 8},
        {"num_chs": 8, "reduction": 16},
        {"num_chs": 8, "reduction": 32},
    ]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"missing \[4\]"):
        build_multiscale_backbone(_NoStride4())
    with pytest.raises(ValueError, match="no `feature_info`"):
        build_multiscale_backbone(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="stride-16 ViT"):
        build_multiscale_backbone(timm.create_model("vit_tiny_patch16_224", patch_size=8, img_size=64))
