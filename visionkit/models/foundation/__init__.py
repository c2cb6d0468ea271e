"""Thin, tested adapters over open_clip and segment-anything: local checkpoints, dense features, batched prompts.

- :mod:`~visionkit.models.foundation.clip`: :func:`load_clip` / :func:`build_clip`, Zip's image preprocessing and
  :class:`ClipResNetTrunk` (ModifiedResNet stem to layer3).
- :mod:`~visionkit.models.foundation.clip_surgery`: CLIP Surgery dense tokens, the 85-template text ensemble, feature
  surgery, per-class similarity maps and image-level class scores.
- :mod:`~visionkit.models.foundation.sam`: :func:`load_sam`, :class:`SamBoxPrompter`, :class:`SamAutomaticMasks`.
- :mod:`~visionkit.models.foundation.checkpoints`: where each official checkpoint comes from, strict loading.
"""

from visionkit.models.foundation.checkpoints import SAM_CHECKPOINTS, clip_checkpoint_hint, sam_checkpoint_hint
from visionkit.models.foundation.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipResNetTrunk,
    build_clip,
    clip_preprocess,
    load_clip,
    preprocess_boundary,
    preprocess_semantic,
)
from visionkit.models.foundation.clip_surgery import (
    SURGERY_TEMPLATES,
    ClipSurgery,
    encode_text_ensemble,
    feature_surgery,
    image_level_scores,
    resize_pos_embed,
    similarity_maps,
    surgery_encode_image,
)
from visionkit.models.foundation.sam import (
    SAM_VARIANTS,
    AutomaticMasks,
    SamAutomaticMasks,
    SamBoxPrompter,
    build_sam,
    load_sam,
    load_sam_weights,
)

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "SAM_CHECKPOINTS",
    "SAM_VARIANTS",
    "SURGERY_TEMPLATES",
    "AutomaticMasks",
    "ClipResNetTrunk",
    "ClipSurgery",
    "SamAutomaticMasks",
    "SamBoxPrompter",
    "build_clip",
    "build_sam",
    "clip_checkpoint_hint",
    "clip_preprocess",
    "encode_text_ensemble",
    "feature_surgery",
    "image_level_scores",
    "load_clip",
    "load_sam",
    "load_sam_weights",
    "preprocess_boundary",
    "preprocess_semantic",
    "resize_pos_embed",
    "sam_checkpoint_hint",
    "similarity_maps",
    "surgery_encode_image",
]
