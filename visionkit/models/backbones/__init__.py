"""Backbones, one file per family following timm's model-file contract; importing a family registers its sizes.

- :mod:`~visionkit.models.backbones.vmamba`: VMamba v2 (``vmamba_tiny``, ``vmamba_small``, ``vmamba_base``,
  ``vmamba_test``), built from the SS2D blocks of :mod:`~visionkit.models.backbones.ss2d`;
  :func:`~visionkit.models.backbones.ss2d.record_scan_inputs` records one SS2D's selective-scan inputs.
- :mod:`~visionkit.models.backbones.modsquad_vit`: Mod-Squad's multi-task MoE ViT (``modsquad_vit_base``,
  ``modsquad_vit_small``, ``modsquad_vit_test``); :mod:`~visionkit.models.backbones.modsquad_upcycle` initialises
  it from a dense timm ViT.
"""

from visionkit.models.backbones import modsquad_vit, vmamba
from visionkit.models.backbones.modsquad_upcycle import UpcycleReport
from visionkit.models.backbones.modsquad_vit import ModSquadViT
from visionkit.models.backbones.ss2d import (
    SS2D,
    LayerNorm2d,
    Linear2d,
    SS2DScanRecord,
    VSSBlock,
    record_scan_inputs,
)
from visionkit.models.backbones.vmamba import VSSM

__all__ = [
    "SS2D",
    "VSSM",
    "LayerNorm2d",
    "Linear2d",
    "ModSquadViT",
    "SS2DScanRecord",
    "UpcycleReport",
    "VSSBlock",
    "modsquad_vit",
    "record_scan_inputs",
    "vmamba",
]
