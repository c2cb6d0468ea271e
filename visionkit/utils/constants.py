"""Constants of the data contracts, defined once (``ARCHITECTURE.md`` "Contracts every part keeps").

- ``IMAGENET_MEAN`` / ``IMAGENET_STD``: the normalisation of torchvision's and timm's ImageNet weights
  (``torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()``; timm ``IMAGENET_DEFAULT_MEAN/STD``), in
  ``[0, 1]`` pixel units.
- ``CLIP_MEAN`` / ``CLIP_STD``: OpenAI CLIP's preprocessing (``openai/CLIP`` ``clip/clip.py`` ``_transform``;
  open_clip ``OPENAI_DATASET_MEAN/STD``), in ``[0, 1]`` pixel units.
- ``IGNORE_INDEX``: the label of pixels that no loss or metric counts in a segmentation target (mmseg's convention;
  ADE20K's "other" class 0 becomes it under ``reduce_zero_label``), also the fill of padded label-map pixels.
"""

from __future__ import annotations

__all__ = ["CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX: int = 255
