"""Multi-scale features (strides 4, 8, 16, 32) from any timm-contract backbone, for detection and dense heads.

:func:`build_multiscale_backbone` wraps an already-created backbone module:

* **hierarchical** models (ResNet, ConvNeXt, VMamba, ...): the stages whose ``feature_info`` reductions are 4, 8,
  16 and 32, read with the model's ``forward_intermediates`` (the classifier head is pruned), or the matching outputs
  of a ``features_only`` wrapper (timm ``FeatureListNet``);
* **single-scale** ViTs (every ``feature_info`` reduction 16, or a ``patch_embed`` with patch size 16): a ViTDet-style
  *simple feature pyramid* (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022) built
  from the last block's stride-16 map: two 2x deconvolutions (stride 4), one deconvolution (stride 8), identity
  (stride 16) and a 2x max-pool (stride 32). A ViT built for a fixed ``img_size`` is switched to timm's dynamic image
  size mode (position embeddings interpolated per input), so any input whose sides are multiples of 16 works.

The result is a :class:`MultiScaleBackbone`: ``forward(x)`` returns four maps, map ``i`` of shape
``(B, channels[i], H / strides[i], W / strides[i])`` (sizes rounded as the backbone's convolutions round them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.layers import Format, LayerNorm2d
from torch import Tensor, nn

__all__ = ["PYRAMID_STRIDES", "MultiScaleBackbone", "SimpleFeaturePyramid", "build_multiscale_backbone"]

#: Strides of the four maps every ``MultiScaleBackbone`` returns.
PYRAMID_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
#: Token stride a single-scale ViT must have for the simple feature pyramid.
VIT_STRIDE = 16


def _feature_entries(backbone: nn.Module) -> list[dict[str, Any]]:
    """``feature_info`` of ``backbone`` as a list of ``{"num_chs", "reduction"}`` dicts (timm list or FeatureInfo)."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(
            f"{type(backbone).__name__} has no `feature_info`; build_multiscale_backbone needs a timm-contract "
            f"backbone (feature_info + forward_intermediates) or a timm features_only model"
        )
    if hasattr(info, "channels") and hasattr(info, "reduction"):  # timm FeatureInfo (features_only wrappers)
        return [{"num_chs": c, "reduction": r} for c, r in zip(info.channels(), info.reduction(), strict=True)]
    return [{"num_chs": int(entry["num_chs"]), "reduction": int(entry["reduction"])} for entry in info]


def _is_features_only(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm feature wrapper whose ``forward`` already returns the feature maps."""
    info = getattr(backbone, "feature_info", None)
    return hasattr(info, "channels") and hasattr(info, "out_indices") and not hasattr(backbone, "forward_intermediates")


def _is_single_scale_vit(backbone: nn.Module, entries: list[dict[str, Any]]) -> bool:
    reductions = {entry["reduction"] for entry in entries}
    if len(entries) > 1 and len(reductions) == 1:
        return True
    return hasattr(backbone, "patch_embed") and len(reductions) <= 1


def _enable_dynamic_img_size(vit: nn.Module) -> None:
    """Put a timm ViT built for a fixed ``img_size`` into dynamic image size mode, in place.

    timm does this at construction with ``dynamic_img_size=True``: the patch embedding stops asserting the input size
    and returns NHWC tokens, and ``_pos_embed`` interpolates the position embeddings to the token grid.
    """
    patch_embed = getattr(vit, "patch_embed", None)
    if getattr(vit, "dynamic_img_size", True) or patch_embed is None:
        return
    patch_embed.strict_img_size = False
    patch_embed.flatten = False
    patch_embed.output_fmt = Format.NHWC
    vit.dynamic_img_size = True


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid: strides 4, 8, 16, 32 from one stride-16 map.

    Args:
        in_channels: Channels ``D`` of the stride-16 map.

    Attributes:
        channels: Output channels per level: ``[D / 4, D / 2, D, D]``.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"SimpleFeaturePyramid needs in_channels divisible by 4, got {in_channels}")
        half, quarter = in_channels // 2, in_channels // 4
        self.to_stride4 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2),
            LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
        )
        self.to_stride8 = nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2)
        self.to_stride32 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.channels = [quarter, half, in_channels, in_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four pyramid levels of ``x`` ``(B, D, h, w)``.

        Args:
            x: The ViT's stride-16 feature map.

        Returns:
            ``(B, D/4, 4h, 4w)``, ``(B, D/2, 2h, 2w)``, ``x`` itself and ``(B, D, h/2, w/2)`` (strides 4 to 32).
        """
        return [self.to_stride4(x), self.to_stride8(x), x, self.to_stride32(x)]


class MultiScaleBackbone(nn.Module):
    """A backbone that returns feature maps at strides 4, 8, 16 and 32 (built by :func:`build_multiscale_backbone`).

    Args:
        backbone: The wrapped model (kept as ``self.backbone``, so that its parameters are the backbone's).
        mode: ``"intermediates"`` (``forward_intermediates`` with ``indices``), ``"features_only"`` (the wrapper's
            own outputs at ``indices``) or ``"vit"`` (last block's tokens through ``pyramid``).
        indices: Which intermediates (feature_info positions) to read, one per stride (``"vit"``: one index).
        channels: Channels of the backbone maps that are returned (before ``projections``).
        pyramid: The simple feature pyramid (``"vit"`` mode only).
        embed_dim_out: If set, every level is projected to this many channels (1x1 conv + LayerNorm2d).

    Attributes:
        channels: Channels of the four returned maps.
        strides: ``[4, 8, 16, 32]``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: str,
        indices: Sequence[int],
        channels: Sequence[int],
        pyramid: SimpleFeaturePyramid | None = None,
        embed_dim_out: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("intermediates", "features_only", "vit"):
            raise ValueError(f"unknown mode {mode!r}")
        self.backbone = backbone
        self.mode = mode
        self.indices = [int(i) for i in indices]
        self.pyramid = pyramid
        self.strides = list(PYRAMID_STRIDES)
        channels = list(channels)
        self.projections: nn.ModuleList | None = None
        if embed_dim_out is not None:
            self.projections = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, embed_dim_out, kernel_size=1, bias=False), LayerNorm2d(embed_dim_out))
                for c in channels
            )
            channels = [embed_dim_out] * len(channels)
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps of ``x`` ``(B, 3, H, W)`` float.

        Args:
            x: The images.

        Returns:
            Four tensors, map ``i`` of shape ``(B, channels[i], ~H / strides[i], ~W / strides[i])``.
        """
        if self.mode == "features_only":
            outputs = self.backbone(x)
            features = [outputs[i] for i in self.indices]
        else:
            features = self.backbone.forward_intermediates(
                x, indices=self.indices, stop_early=True, output_fmt="NCHW", intermediates_only=True
            )
            if self.mode == "vit":
                assert self.pyramid is not None
                features = self.pyramid(features[-1])
        if self.projections is not None:
            features = [projection(f) for projection, f in zip(self.projections, features, strict=True)]
        return list(features)


def _stride_indices(entries: list[dict[str, Any]], name: str) -> list[int]:
    """Positions in ``entries`` of the last feature at each stride 4, 8, 16, 32."""
    last_at: dict[int, int] = {}
    for position, entry in enumerate(entries):
        last_at[entry["reduction"]] = position
    missing = [stride for stride in PYRAMID_STRIDES if stride not in last_at]
    if missing:
        found = [entry["reduction"] for entry in entries]
        raise ValueError(
            f"{name}: build_multiscale_backbone needs features at strides {list(PYRAMID_STRIDES)}, but the model's "
            f"feature_info has reductions {found} (missing {missing})"
        )
    return [last_at[stride] for stride in PYRAMID_STRIDES]


def build_multiscale_backbone(backbone: nn.Module, *, embed_dim_out: int | None = None) -> MultiScaleBackbone:
    """Wrap an already-created backbone so that it returns feature maps at strides 4, 8, 16 and 32.

    Hierarchical models keep only the layers up to the stride-32 stage (timm ``prune_intermediate_layers`` drops the
    classifier, so every parameter gets a gradient); single-scale ViTs get a :class:`SimpleFeaturePyramid` and are
    switched to dynamic image size mode if needed.

    Args:
        backbone: A timm-contract model (``feature_info`` + ``forward_intermediates``) or a timm ``features_only``
            model (whose ``out_indices`` must include strides 4 to 32).
        embed_dim_out: Project every level to this many channels (default: keep the backbone's channels).

    Returns:
        The wrapped backbone; ``channels`` and ``strides`` describe its four outputs.

    Raises:
        ValueError: The model has no ``feature_info``, lacks one of the strides, or is a ViT whose token stride
            is not 16.
    """
    name = type(backbone).__name__
    entries = _feature_entries(backbone)
    if _is_single_scale_vit(backbone, entries):
        stride = entries[-1]["reduction"] if entries else VIT_STRIDE
        if stride != VIT_STRIDE:
            raise ValueError(f"{name}: the simple feature pyramid needs a stride-16 ViT, got token stride {stride}")
        if _is_features_only(backbone):
            raise ValueError(
                f"{name}: pass the ViT itself (not a features_only wrapper) to build_multiscale_backbone; the simple "
                f"feature pyramid reads its last block with forward_intermediates"
            )
        _enable_dynamic_img_size(backbone)
        last = len(entries) - 1
        if hasattr(backbone, "prune_intermediate_layers"):
            backbone.prune_intermediate_layers([last], prune_norm=True, prune_head=True)
        pyramid = SimpleFeaturePyramid(entries[last]["num_chs"])
        return MultiScaleBackbone(backbone, "vit", [last], pyramid.channels, pyramid, embed_dim_out)

    indices = _stride_indices(entries, name)
    channels = [entries[i]["num_chs"] for i in indices]
    if _is_features_only(backbone):
        return MultiScaleBackbone(backbone, "features_only", indices, channels, None, embed_dim_out)
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"{name} has no forward_intermediates; create it with features_only=True instead")
    if hasattr(backbone, "prune_intermediate_layers"):
        backbone.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    return MultiScaleBackbone(backbone, "intermediates", indices, channels, None, embed_dim_out)
