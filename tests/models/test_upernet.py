"""UperNet decode head: output shapes, gradients, the role of each input level, clear errors."""

import pytest
import torch
from torch import nn

from visionkit.models.heads.upernet import FCNHead, PyramidPoolingModule, UperNet

CHANNELS = [8, 16, 32, 64]


def _features(batch: int = 2, height: int = 20, width: int = 28) -> list[torch.Tensor]:
    """Maps at strides 4..32 of a (height*4, width*4) image, rounded up like a ResNet's convolutions."""
    sizes = [(height, width), (10, 14), (5, 7), (3, 4)]
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(CHANNELS, sizes, strict=True)]


def test_logits_are_at_the_finest_map_and_aux_at_the_stride_16_map():
    head = UperNet(CHANNELS, num_classes=5, channels=16, aux_channels=8)
    features = _features()
    assert head(features).shape == (2, 5, 20, 28)
    assert head.forward_aux(features).shape == (2, 5, 5, 7)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    head = UperNet(CHANNELS, num_classes=3, channels=16, aux_channels=8)
    features = [f.requires_grad_() for f in _features()]
    loss = head(features).square().mean() + head.forward_aux(features).square().mean()
    loss.backward()
    missing = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)


def test_coarse_context_reaches_every_output_pixel():
    """The PPM and the top-down path spread the stride-32 map over the whole stride-4 output."""
    torch.manual_seed(0)
    head = UperNet(CHANNELS, num_classes=3, channels=16).eval()
    features = _features(batch=1)
    changed = [f.clone() for f in features]
    changed[-1][..., 0, 0] += 10.0  # one coarse cell only
    with torch.no_grad():
        difference = (head(changed) - head(features)).abs().amax(dim=1)
    assert (difference > 0).all()


def test_pyramid_pooling_keeps_the_size_and_sees_global_context():
    torch.manual_seed(0)
    ppm = PyramidPoolingModule(4, 6, pool_scales=(1, 2)).eval()
    x = torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        out = ppm(x)
        assert out.shape == (1, 6, 5, 7)
        # With a 1x1 pooled branch, changing one input cell changes the output even 4 cells away (beyond 3x3 reach).
        y = x.clone()
        y[..., 0, 0] += 5.0
        assert (ppm(y) - out)[..., 4, 6].abs().max() > 0


def test_without_aux_channels_there_is_no_aux_head():
    head = UperNet(CHANNELS, num_classes=3, channels=16)
    assert head.aux_head is None
    with pytest.raises(RuntimeError, match="no auxiliary head"):
        head.forward_aux(_features())


def test_wrong_inputs_raise_clear_errors():
    head = UperNet(CHANNELS, num_classes=3, channels=16)
    with pytest.raises(ValueError, match="expects 4 feature maps, got 3"):
        head(_features()[:3])
    bad = _features()
    bad[1] = torch.randn(2, 17, 10, 14)
    with pytest.raises(ValueError, match=r"expects feature channels \[8, 16, 32, 64\], got \[8, 17, 32, 64\]"):
        head(bad)
    with pytest.raises(ValueError, match="at least 2 feature maps"):
        UperNet([8], num_classes=3)
    with pytest.raises(ValueError, match="aux_index 4 is out of range"):
        UperNet(CHANNELS, num_classes=3, aux_channels=8, aux_index=4)
    with pytest.raises(ValueError, match="pool_scales"):
        PyramidPoolingModule(4, 4, pool_scales=(0, 2))


def test_fcn_head_and_custom_norm_layer():
    head = FCNHead(8, num_classes=4, channels=6, norm_layer=lambda c: nn.GroupNorm(2, c))
    assert isinstance(head.conv[1], nn.GroupNorm)
    assert head(torch.randn(1, 8, 3, 5)).shape == (1, 4, 3, 5)
    # GroupNorm has no batch statistics: a batch of one 1x1 pooled map trains fine.
    upernet = UperNet(CHANNELS, num_classes=3, channels=8, norm_layer=lambda c: nn.GroupNorm(2, c)).train()
    assert upernet(_features(batch=1)).shape == (1, 3, 20, 28)
