"""One OpenUS network (student or teacher): a VMamba backbone, its token view, the iBOT head and the pixel decoder.

The released code wraps ``Backbone_DINOv2_VSSM_2`` + ``iBOTHead`` in iBOT's ``MultiCropWrapper``. Here the same parts
are one module (docs/methods/openus.md, "Network"):

- tokens: the last stage's map ``(B, C, h, w)`` through a LayerNorm over channels (the release's ``outnorm3``; here
  the backbone's own ``classifier.norm``, so that the exported backbone carries it to the probes), flattened to
  ``(B, h·w, C)``, with the mean token prepended as the "CLS" token: ``(B, 1 + h·w, C)`` (OpenUS has no learned
  CLS token and no position embedding);
- ``head``: the iBOT head on every token (CLS logits and patch logits);
- ``decoder`` (student only): the pixel-shuffle decoder from the normalised last-stage map back to pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from visionkit.methods.openus.heads import IBOTHead, PixelShuffleDecoder

__all__ = ["NetworkOutput", "OpenUSNetwork"]


class NetworkOutput(NamedTuple):
    """What one forward of :class:`OpenUSNetwork` gives.

    Attributes:
        cls_logits: ``(B, out_dim)`` head output of the CLS (mean) token.
        patch_logits: ``(B, h·w, patch_out_dim)`` head output of every patch token.
        feature_map: ``(B, C, h, w)`` the normalised last-stage map.
        reconstruction: ``(B, 3, H, W)`` decoded pixels, or None (no decoder, or not asked for).
    """

    cls_logits: Tensor
    patch_logits: Tensor
    feature_map: Tensor
    reconstruction: Tensor | None


class OpenUSNetwork(nn.Module):
    """Backbone + iBOT head (+ pixel decoder) of OpenUS.

    Args:
        backbone: A VMamba (``visionkit.models.backbones.VSSM``) built with ``num_classes=0`` (its ``classifier.norm``
            normalises the tokens) and, for the student, ``mask_token=True``.
        head: The iBOT head.
        decoder: The pixel decoder (student), or None (teacher).
    """

    def __init__(self, backbone: nn.Module, head: IBOTHead, decoder: PixelShuffleDecoder | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.decoder = decoder

    def feature_map(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalised last-stage map ``(B, C, h, w)`` of ``images`` ``(B, 3, H, W)``.

        Args:
            images: Normalised images.
            mask: Optional ``(B, h', w')`` bool token mask (True = replaced by the mask token) on a grid whose sides
                divide the patch-embedding grid (``H / 4``); OpenUS masks on the last-stage grid ``(H / 32, W / 32)``.
        """
        return self.backbone.classifier.norm(self.backbone.forward_features(images, mask))

    def forward(self, images: Tensor, mask: Tensor | None = None, reconstruct: bool = False) -> NetworkOutput:
        """Head logits (and optionally the reconstruction) of one batch of equally sized crops.

        Args:
            images: ``(B, 3, H, W)`` normalised crops.
            mask: Optional token mask, as in :meth:`feature_map`.
            reconstruct: Decode pixels too (needs a decoder).

        Returns:
            The :class:`NetworkOutput`.
        """
        feature_map = self.feature_map(images, mask)
        tokens = feature_map.flatten(2).transpose(1, 2)  # (B, h·w, C)
        tokens = _prepend_mean_token(tokens)
        cls_logits, patch_logits = self.head(tokens)
        reconstruction = None
        if reconstruct:
            if self.decoder is None:
                raise ValueError("this OpenUSNetwork has no pixel decoder (the teacher has none)")
            reconstruction = self.decoder(feature_map)
        return NetworkOutput(cls_logits, patch_logits, feature_map, reconstruction)


def _prepend_mean_token(tokens: Tensor) -> Tensor:
    """``(B, L, C)`` → ``(B, 1 + L, C)`` with the mean token first (the released ``AdaptiveAvgPool1d`` CLS)."""
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
