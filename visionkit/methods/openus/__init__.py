"""OpenUS: self-adaptive masked contrastive pretraining for ultrasound (Zheng et al., arXiv 2511.11510).

iBOT-style student / teacher self-distillation on a VMamba backbone, plus masked pixel reconstruction, with a token
mask that adapts during training: the teacher's attention map and the student's reconstruction error choose which
tokens to hide (``docs/methods/openus.md``: the method, the released code's behaviour and where it differs from the
paper). Building blocks: :mod:`~visionkit.methods.openus.masking` (adaptive and block masks, their schedules, the
reconstruction-importance state), :mod:`~visionkit.methods.openus.heads` (iBOT head, pixel decoder) and
:mod:`~visionkit.methods.openus.losses` (iBOT loss, masked pixel MSE); :mod:`~visionkit.methods.openus.network`
(one student / teacher network), :mod:`~visionkit.methods.openus.schedules` (per-step schedules, per-parameter clipping,
the EMA update) and :class:`~visionkit.methods.openus.pretrain.OpenUSPretrain` (the LightningModule).
"""

from visionkit.methods.openus.heads import IBOTHead, PixelShuffleDecoder, WeightNormLinear
from visionkit.methods.openus.losses import IBOTLoss, masked_patch_error, masked_pixel_mse
from visionkit.methods.openus.masking import (
    ReconImportance,
    adaptive_mask,
    alpha_at,
    block_mask,
    block_masks,
    masking_score,
    top_fraction_at,
)
from visionkit.methods.openus.network import NetworkOutput, OpenUSNetwork
from visionkit.methods.openus.pretrain import OpenUSPretrain
from visionkit.methods.openus.schedules import clip_gradients_per_parameter, cosine_schedule_at, update_teacher

__all__ = [
    "IBOTHead",
    "IBOTLoss",
    "NetworkOutput",
    "OpenUSNetwork",
    "OpenUSPretrain",
    "PixelShuffleDecoder",
    "ReconImportance",
    "WeightNormLinear",
    "adaptive_mask",
    "alpha_at",
    "block_mask",
    "block_masks",
    "clip_gradients_per_parameter",
    "cosine_schedule_at",
    "masked_patch_error",
    "masked_pixel_mse",
    "masking_score",
    "top_fraction_at",
    "update_teacher",
]
