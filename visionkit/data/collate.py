"""Collate functions that turn a list of ``(image, target)`` samples into a batch, one per task.

* :func:`collate_detection` keeps lists (images differ in size; torchvision detection models take lists).
* :func:`collate_segmentation` pads every image and label map to the largest size in the batch (bottom/right; image
  with 0, label map with 255) and stacks them.
* :func:`collate_classification` and :func:`collate_unlabeled` stack same-size images.

All of them check that the images of a batch have the same number of channels and the same dtype, and raise a
``ValueError`` naming the offending sample otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from visionkit.utils.constants import IGNORE_INDEX

__all__ = [
    "collate_classification",
    "collate_detection",
    "collate_segmentation",
    "collate_unlabeled",
]

Batch = Sequence[tuple[Tensor, dict[str, Any]]]


def _describe(target: dict[str, Any], index: int) -> str:
    return f"sample {index}" + (f" (image_id={target['image_id']})" if "image_id" in target else "")


def _check_images(batch: Batch, name: str) -> None:
    """Check that ``batch`` is non-empty and its images are ``(C, H, W)`` tensors of one channel count and dtype."""
    if len(batch) == 0:
        raise ValueError(f"{name}: got an empty batch")
    first = batch[0][0]
    for index, (image, target) in enumerate(batch):
        if not isinstance(image, Tensor) or image.ndim != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"{name}: {_describe(target, index)} image must be a (C, H, W) tensor, got {shape}")
        if image.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name}: {_describe(target, index)} has {image.shape[0]} channels but sample 0 has {first.shape[0]}"
            )
        if image.dtype != first.dtype:
            raise ValueError(
                f"{name}: {_describe(target, index)} has dtype {image.dtype} but sample 0 has {first.dtype}"
            )


def _stack_same_size(batch: Batch, name: str) -> Tensor:
    first = batch[0][0]
    for index, (image, target) in enumerate(batch):
        if image.shape != first.shape:
            raise ValueError(
                f"{name}: {_describe(target, index)} has size {tuple(image.shape)} but sample 0 has "
                f"{tuple(first.shape)}; resize or crop to a fixed size first"
            )
    return torch.stack([image for image, _ in batch])


def _gather(targets: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[Any]]:
    """Lists of the values of ``keys``, one entry per sample; keys missing from every target are left out."""
    return {key: [target.get(key) for target in targets] for key in keys if any(key in t for t in targets)}


def collate_detection(batch: Batch) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Batch detection / instance-segmentation samples as lists (images may differ in size).

    Args:
        batch: Samples ``(image (C, H_i, W_i), target)`` with ``boxes``, ``labels``, ``masks``, ``image_id``, ...

    Returns:
        ``(images, targets)``: the images and target dicts in batch order, unchanged — the input format of
        torchvision's detection models.

    Raises:
        ValueError: If the batch is empty or the images differ in channel count or dtype.
    """
    _check_images(batch, "collate_detection")
    return [image for image, _ in batch], [target for _, target in batch]


def collate_segmentation(
    batch: Batch, fill: float = 0, ignore_index: int = IGNORE_INDEX, size_divisor: int = 1
) -> tuple[Tensor, dict[str, Any]]:
    """Pad semantic-segmentation samples to the largest height and width in the batch and stack them.

    Padding is added at the bottom/right, so pixel coordinates are unchanged; padded label pixels are ``ignore_index``
    and never count in the loss or the metric. ``image_size`` records each sample's size before padding, so that
    predictions can be cropped back before they are resized to ``orig_size``.

    Args:
        batch: Samples ``(image (C, H_i, W_i), target)`` with ``mask`` ``(H_i, W_i)`` int64.
        fill: Image value of padded pixels (in the image's units; 0 after normalisation is the mean colour).
        ignore_index: Label value of padded pixels.
        size_divisor: The padded height and width are rounded up to a multiple of this (e.g. a backbone's stride).

    Returns:
        ``(images (B, C, H, W), target)``; ``target`` holds ``mask`` ``(B, H, W)`` int64, ``image_size`` (list of
        each sample's ``(H_i, W_i)`` before padding) and lists of ``image_id`` and ``orig_size`` (when present).

    Raises:
        ValueError: If the batch is empty, images differ in channel count or dtype, or a label map is missing or does
            not match its image.
    """
    name = "collate_segmentation"
    _check_images(batch, name)
    for index, (image, target) in enumerate(batch):
        label_map = target.get("mask")
        if not isinstance(label_map, Tensor) or tuple(label_map.shape) != tuple(image.shape[-2:]):
            got = tuple(label_map.shape) if isinstance(label_map, Tensor) else "no 'mask'"
            raise ValueError(
                f"{name}: {_describe(target, index)} needs a label map 'mask' of shape {tuple(image.shape[-2:])}, "
                f"got {got}"
            )
    if size_divisor < 1:
        raise ValueError(f"{name}: size_divisor must be >= 1, got {size_divisor}")
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    height, width = height + (-height % size_divisor), width + (-width % size_divisor)
    first = batch[0][0]
    images = first.new_full((len(batch), first.shape[0], height, width), fill)
    masks = torch.full((len(batch), height, width), ignore_index, dtype=torch.int64, device=first.device)
    for index, (image, target) in enumerate(batch):
        images[index, :, : image.shape[-2], : image.shape[-1]] = image
        masks[index, : image.shape[-2], : image.shape[-1]] = target["mask"]
    targets = [target for _, target in batch]
    collated: dict[str, Any] = {"mask": masks, "image_size": [tuple(image.shape[-2:]) for image, _ in batch]}
    collated.update(_gather(targets, ("image_id", "orig_size")))
    return images, collated


def collate_classification(batch: Batch) -> tuple[Tensor, dict[str, Any]]:
    """Stack same-size classification samples.

    Args:
        batch: Samples ``(image (C, H, W), target)`` with ``label`` (int64 scalar tensor or int) and ``image_id``.

    Returns:
        ``(images (B, C, H, W), {"label": (B,) int64, "image_id": list})``.

    Raises:
        ValueError: If the batch is empty, images differ in channel count, dtype or size, or a label is missing.
    """
    name = "collate_classification"
    _check_images(batch, name)
    images = _stack_same_size(batch, name)
    labels = []
    for index, (_, target) in enumerate(batch):
        label = target.get("label")
        is_integer = isinstance(label, int) and not isinstance(label, bool)
        if isinstance(label, Tensor):
            is_integer = label.numel() == 1 and not label.is_floating_point() and label.dtype != torch.bool
        if not is_integer:
            raise ValueError(f"{name}: {_describe(target, index)} needs an integer scalar 'label', got {label!r}")
        labels.append(int(label))
    collated: dict[str, Any] = {"label": torch.tensor(labels, dtype=torch.int64)}
    collated.update(_gather([target for _, target in batch], ("image_id",)))
    return images, collated


def collate_unlabeled(batch: Batch) -> tuple[Tensor, dict[str, list[Any]]]:
    """Stack same-size unlabeled samples (pretraining corpora).

    Args:
        batch: Samples ``(image (C, H, W), target)``; the target holds e.g. ``image_id`` and ``path``.

    Returns:
        ``(images (B, C, H, W), target)`` where ``target`` maps every target key to the list of its per-sample values.

    Raises:
        ValueError: If the batch is empty or the images differ in channel count, dtype or size.
    """
    name = "collate_unlabeled"
    _check_images(batch, name)
    images = _stack_same_size(batch, name)
    targets = [target for _, target in batch]
    keys = list(dict.fromkeys(key for target in targets for key in target))
    return images, _gather(targets, keys)
