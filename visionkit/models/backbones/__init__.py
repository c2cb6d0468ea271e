"""Backbones, one file per family following timm's model-file contract; importing a family registers its sizes.

- :mod:`~visionkit.models.backbones.vmamba`: VMamba v2 (``vmamba_tiny``, ``vmamba_small``, ``vmamba_base``,
  ``vmamba_test``), built from the SS2D blocks of :mod:`~visionkit.models.backbones.ss2d`;
  :func:`~visionkit.models.backbones.ss2d.record_scan_inputs` records one SS2D's selective-scan inputs.
"""

from visionkit.models.backbones import vmamba
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
    "SS2DScanRecord",
    "VSSBlock",
    "record_scan_inputs",
    "vmamba",
]
