"""Weight initialisation shared by the backbones: the ViT / Swin / VMamba convention of timm's model files."""

from __future__ import annotations

from timm.layers import trunc_normal_
from torch import nn

__all__ = ["init_linear_and_norm"]


def init_linear_and_norm(module: nn.Module, std: float = 0.02) -> None:
    """Initialise one module the way ViT, Swin and VMamba do (use with ``model.apply``).

    ``nn.Linear`` (and subclasses such as VMamba's ``Linear2d``): weight truncated normal with ``std``, bias 0.
    ``nn.LayerNorm`` (and subclasses): weight 1, bias 0. Every other module keeps its own initialisation (convolutions,
    SS2D and MoE expert parameters).

    Args:
        module: The module visited by ``apply``.
        std: Standard deviation of the truncated normal (timm: 0.02, truncated at ±2).
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
