"""Models: backbones (one file per family, timm's contract), reusable layers, heads and foundation-model adapters.

Importing this package registers every visionkit backbone with visionkit's and timm's registries.
"""

from visionkit.models import backbones, layers
from visionkit.models.backbones import SS2D, VSSM, LayerNorm2d, Linear2d, VSSBlock

__all__ = ["SS2D", "VSSM", "LayerNorm2d", "Linear2d", "VSSBlock", "backbones", "layers"]
