"""UperNet decode head: pyramid pooling on the coarsest map, an FPN over all maps, one fused classifier.

Unified Perceptual Parsing (Xiao et al., ECCV 2018), in the form mmsegmentation's ``UPerHead`` made the standard
ADE20K head for backbone comparisons (Swin, ConvNeXt, BEiT, MAE, ...):

1. a Pyramid Pooling Module (PSPNet) on the last (stride-32) map: adaptive average pooling to ``s x s`` for every
   ``s`` in ``pool_scales``, a 1x1 conv-BN-ReLU per scale, bilinear upsampling back, concatenation with the map and a
   3x3 conv-BN-ReLU bottleneck;
2. an FPN: a 1x1 conv-BN-ReLU lateral per other level, a top-down pathway adding the bilinearly upsampled coarser
   level, a 3x3 conv-BN-ReLU per level (the PPM output is the top level);
3. fusion: every level upsampled to the finest (stride-4) map, concatenated, a 3x3 conv-BN-ReLU;
4. dropout and a 1x1 classifier.

An optional auxiliary :class:`FCNHead` (one 3x3 conv-BN-ReLU, dropout, 1x1 classifier) reads the stride-16 map; its
loss is added with weight 0.4 during training (mmseg's convention) and it is unused at inference.

torchvision's ``FeaturePyramidNetwork`` is not reused here: its blocks have no activation, it upsamples with nearest
neighbour, and its top level is a lateral conv of the input rather than the PPM output, all of which differ from
UperNet. The building block is torchvision's ``Conv2dNormActivation``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["FCNHead", "PyramidPoolingModule", "UperNet"]

NormLayer = Callable[[int], nn.Module]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``, mmseg's ``resize``) to ``size`` ``(H, W)``; no-op if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling: pooled context at several grid sizes, concatenated with the input, fused.

    Args:
        in_channels: Channels of the input map.
        channels: Channels of every pooled branch and of the output.
        pool_scales: Output grid sizes of the adaptive average pools.
        norm_layer: Normalisation after each conv (``BatchNorm2d``; a 1x1 pooled map in training needs batch >= 2).

    Shapes:
        ``(B, in_channels, h, w) -> (B, channels, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if not pool_scales or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"pool_scales must be positive grid sizes, got {tuple(pool_scales)}")
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(int(scale)),
                Conv2dNormActivation(in_channels, channels, kernel_size=1, norm_layer=norm_layer),
            )
            for scale in pool_scales
        )
        self.bottleneck = Conv2dNormActivation(
            in_channels + len(pool_scales) * channels, channels, kernel_size=3, norm_layer=norm_layer
        )

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the input with its upsampled pooled branches and fuse them with a 3x3 conv."""
        size = x.shape[-2:]
        pooled = [_resize(branch(x), size) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FCNHead(nn.Module):
    """Auxiliary FCN head (mmseg ``FCNHead`` with ``num_convs=1``, ``concat_input=False``).

    Args:
        in_channels: Channels of the input map.
        num_classes: Number of output classes.
        channels: Channels of the hidden 3x3 conv (mmseg's UperNet configs: 256).
        dropout: ``Dropout2d`` probability before the classifier.
        norm_layer: Normalisation after the hidden conv.

    Shapes:
        ``(B, in_channels, h, w) -> (B, num_classes, h, w)`` float logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv = Conv2dNormActivation(in_channels, channels, kernel_size=3, norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits at the input's resolution."""
        return self.classifier(self.dropout(self.conv(x)))


class UperNet(nn.Module):
    """UperNet decode head over a list of multi-scale feature maps (finest first).

    Args:
        in_channels: Channels of each input map, finest (stride 4) first, e.g. ``[64, 128, 256, 512]`` for ResNet-18.
        num_classes: Number of output classes (150 for ADE20K).
        channels: Width of the PPM, FPN and fusion convs (mmseg: 512; smaller for tiny models).
        pool_scales: PPM grid sizes (PSPNet / mmseg: ``(1, 2, 3, 6)``).
        dropout: ``Dropout2d`` probability before the classifiers (mmseg: 0.1).
        aux_channels: Hidden width of the auxiliary :class:`FCNHead`; ``None`` builds no auxiliary head.
        aux_index: Which input map feeds the auxiliary head (2 = the stride-16 map, mmseg's ``in_index=2``).
        norm_layer: Normalisation after each conv (default ``BatchNorm2d``).

    Shapes:
        ``forward([(B, in_channels[i], H_i, W_i)]) -> (B, num_classes, H_0, W_0)``: logits at the finest map's
        resolution (stride 4 of the image); upsample them to the image size for the loss and the prediction.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_channels: int | None = None,
        aux_index: int = 2,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if len(in_channels) < 2:
            raise ValueError(f"UperNet needs at least 2 feature maps, got in_channels={in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, pool_scales, norm_layer)
        self.lateral_convs = nn.ModuleList(
            Conv2dNormActivation(c, channels, kernel_size=1, norm_layer=norm_layer) for c in in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            Conv2dNormActivation(channels, channels, kernel_size=3, norm_layer=norm_layer) for _ in in_channels[:-1]
        )
        self.fuse = Conv2dNormActivation(len(in_channels) * channels, channels, kernel_size=3, norm_layer=norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.aux_index = aux_index
        self.aux_head: FCNHead | None = None
        if aux_channels is not None:
            if not -len(in_channels) <= aux_index < len(in_channels):
                raise ValueError(f"aux_index {aux_index} is out of range for {len(in_channels)} feature maps")
            self.aux_head = FCNHead(in_channels[aux_index], num_classes, aux_channels, dropout, norm_layer)

    def _check(self, features: Sequence[Tensor]) -> None:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UperNet expects {len(self.in_channels)} feature maps, got {len(features)}")
        got = [int(f.shape[1]) for f in features]
        if got != self.in_channels:
            raise ValueError(f"UperNet expects feature channels {self.in_channels}, got {got}")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Class logits at the finest map's resolution.

        Args:
            features: Maps ``(B, in_channels[i], H_i, W_i)``, finest first (strides 4, 8, 16, 32 for a standard
                backbone).

        Returns:
            ``(B, num_classes, H_0, W_0)`` float logits.
        """
        self._check(features)
        levels = [lateral(f) for lateral, f in zip(self.lateral_convs, features[:-1], strict=True)]
        levels.append(self.ppm(features[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse context added to the finer level
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:-1], strict=True)]
        outputs.append(levels[-1])
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([_resize(out, size) for out in outputs], dim=1))
        return self.classifier(self.dropout(fused))

    def forward_aux(self, features: Sequence[Tensor]) -> Tensor:
        """Auxiliary-head logits ``(B, num_classes, H_a, W_a)`` at the resolution of ``features[aux_index]``.

        Raises:
            RuntimeError: The head was built with ``aux_channels=None``.
        """
        if self.aux_head is None:
            raise RuntimeError("this UperNet has no auxiliary head (built with aux_channels=None)")
        self._check(features)
        return self.aux_head(features[self.aux_index])
