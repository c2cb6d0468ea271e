"""Transform presets: the standard training and evaluation pipelines for detection, segmentation and classification.

Each builder returns a :class:`~visionkit.data.transforms.Compose` of joint transforms; the recipes and their sources
are given per builder. The datamodules build their pipelines here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from visionkit.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    PadToMultiple,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ResizeShortestSide,
    ToFloat,
    TransformFn,
)
from visionkit.utils.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["classification_transforms", "detection_transforms", "segmentation_transforms"]


def detection_transforms(
    train: bool,
    short_side: int = 800,
    max_size: int = 1333,
    train_short_sides: Sequence[int] | None = None,
    flip_prob: float = 0.5,
    normalize: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Compose:
    """Detection / instance-segmentation preset (detectron2 COCO recipe: short side 800, long side ≤ 1333).

    Args:
        train: Training pipeline (multi-scale resize and flip) or evaluation pipeline (fixed resize).
        short_side: Short-side length for evaluation, and for training when ``train_short_sides`` is ``None``.
        max_size: Upper bound on the long side in pixels.
        train_short_sides: Short sides sampled uniformly in training (e.g. detectron2's 640–800 step 32).
        flip_prob: Horizontal-flip probability in training.
        normalize: Standardise with ``mean``/``std``; ``False`` gives float32 images in ``[0, 1]``, which is what
            torchvision's Mask R-CNN expects (it normalises internally).
        mean: Per-channel mean for ``normalize``.
        std: Per-channel standard deviation for ``normalize``.
        generator: RNG for the random transforms; ``None`` uses torch's global RNG.

    Returns:
        The composed pipeline; output images are float32.
    """
    sides: int | Sequence[int] = short_side
    if train and train_short_sides:
        sides = list(train_short_sides)
    steps: list[TransformFn] = [ResizeShortestSide(sides, max_size, generator)]
    if train:
        steps.append(RandomHorizontalFlip(flip_prob, generator))
    steps.append(Normalize(mean, std) if normalize else ToFloat())
    return Compose(steps)


def segmentation_transforms(
    train: bool,
    crop_size: int | Sequence[int] = 512,
    short_side: int = 512,
    max_size: int = 2048,
    scale_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
    size_divisor: int | None = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Compose:
    """Semantic-segmentation preset (ADE20K recipe of mmseg / Mask2Former).

    Training: resize the short side to ``short_side × r`` for ``r`` in ``scale_range`` at steps of 0.1 (Mask2Former's
    ``[int(x * 0.1 * 512) for x in range(5, 21)]``), random crop ``crop_size`` with ``cat_max_ratio`` (mmseg 0.75),
    flip, normalise. Evaluation: resize the short side to ``short_side``, normalise, pad to ``size_divisor``.

    Args:
        train: Training or evaluation pipeline.
        crop_size: Training crop ``(height, width)`` in pixels, or one int for a square.
        short_side: Base short-side length in pixels.
        max_size: Upper bound on the long side in pixels.
        scale_range: Range of the training short-side multiplier ``r``.
        cat_max_ratio: Largest share one class may take of a training crop.
        flip_prob: Horizontal-flip probability in training.
        ignore_index: Label value for padded and ignored pixels.
        size_divisor: Evaluation images are padded to a multiple of this; ``None`` disables padding.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        generator: RNG for the random transforms; ``None`` uses torch's global RNG.

    Returns:
        The composed pipeline; output images are normalised float32.
    """
    if not train:
        steps: list[TransformFn] = [ResizeShortestSide(short_side, max_size), Normalize(mean, std)]
        if size_divisor:
            steps.append(PadToMultiple(size_divisor, fill=0, ignore_index=ignore_index))
        return Compose(steps)
    low, high = round(scale_range[0] * 10), round(scale_range[1] * 10)
    if not 0 < low <= high:
        raise ValueError(f"segmentation_transforms: scale_range must satisfy 0 < min <= max, got {scale_range}")
    sides = [max(1, int(short_side * step * 0.1)) for step in range(low, high + 1)]
    return Compose(
        [
            ResizeShortestSide(sides, max_size, generator),
            RandomCrop(crop_size, cat_max_ratio, ignore_index, fill=0, generator=generator),
            RandomHorizontalFlip(flip_prob, generator),
            Normalize(mean, std),
        ]
    )


def classification_transforms(
    train: bool,
    image_size: int = 224,
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    generator: torch.Generator | None = None,
) -> Compose:
    """Classification preset (timm / torchvision ImageNet recipe).

    Training: ``RandomResizedCrop(image_size, scale)``, flip, normalise. Evaluation: resize the short side to
    ``floor(image_size / crop_pct)`` (256 for 224), centre crop ``image_size``, normalise.

    Args:
        train: Training or evaluation pipeline.
        image_size: Output side length in pixels (square).
        crop_pct: Evaluation centre-crop fraction.
        scale: Training crop-area range as a fraction of the image.
        flip_prob: Horizontal-flip probability in training.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        generator: RNG for the random transforms; ``None`` uses torch's global RNG.

    Returns:
        The composed pipeline; output images are normalised float32 ``(C, image_size, image_size)``.
    """
    if train:
        return Compose(
            [
                RandomResizedCrop(image_size, scale=scale, generator=generator),
                RandomHorizontalFlip(flip_prob, generator),
                Normalize(mean, std),
            ]
        )
    if not 0 < crop_pct <= 1:
        raise ValueError(f"classification_transforms: crop_pct must be in (0, 1], got {crop_pct}")
    return Compose(
        [ResizeShortestSide(math.floor(image_size / crop_pct)), CenterCrop(image_size), Normalize(mean, std)]
    )
