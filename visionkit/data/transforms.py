"""Joint image/target transforms for detection, instance and semantic segmentation, and classification samples.

Every transform is a callable ``(image, target) -> (image, target)``; ``image`` is ``(C, H, W)``, uint8 in ``[0, 255]``
or float in ``[0, 1]``. Only the target keys present are transformed, all others pass through: ``boxes`` (float
``(N, 4)`` xyxy, absolute pixels), ``masks`` (``(N, H, W)`` bool) and ``mask`` (``(H, W)`` int64 label map, ignore
255). Any other tensor whose first dimension is ``N`` (``labels``, ``iscrowd``, ...) is per-instance and is filtered
together with ``boxes``/``masks``; ``label``, ``image_id``, ``orig_size`` and ``path`` never are.

Images are resized with antialiased bilinear interpolation, masks and label maps with pixel-centre nearest neighbour
(``nearest-exact``), so a label map only ever holds values it held before. After every geometric operation boxes are
clipped to the image, and instances whose box is thinner than ``MIN_BOX_SIZE`` or whose mask became empty are removed
from every per-instance key at once.

Random transforms take an optional ``torch.Generator``; without one they draw from torch's global RNG, which Lightning
seeds per dataloader worker. The same generator seed gives the same output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visionkit.utils.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

Target = dict[str, Any]
Sample = tuple[Tensor, Target]
TransformFn = Callable[[Tensor, Target], Sample]

__all__ = [
    "MIN_BOX_SIZE",
    "CenterCrop",
    "Compose",
    "JointTransform",
    "Normalize",
    "PadToMultiple",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ResizeShortestSide",
    "Sample",
    "Target",
    "ToFloat",
    "TransformFn",
    "check_sample",
    "crop_sample",
    "hflip_sample",
    "pad_sample",
    "remove_empty_instances",
    "resize_sample",
]


# Boxes whose width or height falls below this many pixels are removed (torchvision `SanitizeBoundingBoxes` min_size=1).
MIN_BOX_SIZE = 1.0

# Per-instance keys whose length is checked against N; other length-N tensors are filtered without a check.
_CHECKED_INSTANCE_KEYS = ("labels", "iscrowd", "area", "scores")
_NON_INSTANCE_KEYS = frozenset({"mask", "label", "image_id", "orig_size", "path"})


def _where(target: Target) -> str:
    return f" (image_id={target['image_id']})" if "image_id" in target else ""


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def check_sample(image: Tensor, target: Target, op: str) -> tuple[int, int]:
    """Validate an ``(image, target)`` pair against the data contract and return the image size ``(H, W)`` in pixels.

    Args:
        image: ``(C, H, W)`` uint8 or floating-point tensor.
        target: Target dict; ``boxes`` ``(N, 4)``, ``masks`` ``(N, H, W)``, ``mask`` ``(H, W)`` and the length of
            ``labels``/``iscrowd``/``area``/``scores`` are checked when present.
        op: Name of the caller, used in error messages.

    Raises:
        ValueError: If a shape does not match the contract or the image, or instance counts disagree.
        TypeError: If the image is neither uint8 nor floating point, or ``boxes`` is not floating point.
    """
    where = _where(target)
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise ValueError(f"{op}: image must be a (C, H, W) tensor, got {_shape(image)}{where}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"{op}: image must be uint8 or floating point, got {image.dtype}{where}")
    height, width = image.shape[-2:]
    num_instances = None
    boxes = target.get("boxes")
    if boxes is not None:
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{op}: target['boxes'] must have shape (N, 4), got {_shape(boxes)}{where}")
        if not boxes.is_floating_point():
            raise TypeError(f"{op}: target['boxes'] must be floating point, got {boxes.dtype}{where}")
        num_instances = boxes.shape[0]
    masks = target.get("masks")
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.ndim != 3 or tuple(masks.shape[1:]) != (height, width):
            raise ValueError(
                f"{op}: target['masks'] must have shape (N, {height}, {width}) like the image, got {_shape(masks)}"
                f"{where}"
            )
        if num_instances is not None and masks.shape[0] != num_instances:
            raise ValueError(f"{op}: target['masks'] has {masks.shape[0]} instances, boxes {num_instances}{where}")
        num_instances = masks.shape[0]
    label_map = target.get("mask")
    if label_map is not None and (not isinstance(label_map, Tensor) or tuple(label_map.shape) != (height, width)):
        raise ValueError(
            f"{op}: target['mask'] must have shape ({height}, {width}) like the image, got {_shape(label_map)}{where}"
        )
    for key in _CHECKED_INSTANCE_KEYS if num_instances is not None else ():
        value = target.get(key)
        if isinstance(value, Tensor) and (value.ndim == 0 or value.shape[0] != num_instances):
            raise ValueError(
                f"{op}: target[{key!r}] has shape {_shape(value)} but there are {num_instances} instances{where}"
            )
    return height, width


def remove_empty_instances(target: Target) -> Target:
    """Drop instances whose box is thinner than ``MIN_BOX_SIZE`` px or whose mask is empty.

    Every per-instance tensor (first dimension ``N``) keeps the same surviving instances. Returns a new dict (or
    ``target`` itself when nothing is removed or it holds no ``boxes``/``masks``).
    """
    reference = target.get("boxes", target.get("masks"))
    if not isinstance(reference, Tensor) or reference.shape[0] == 0:
        return target
    num_instances = reference.shape[0]
    keep = torch.ones(num_instances, dtype=torch.bool, device=reference.device)
    if "boxes" in target:
        boxes = target["boxes"]
        keep &= (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIZE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIZE)
    if "masks" in target:
        keep &= target["masks"].flatten(1).any(dim=1)
    if bool(keep.all()):
        return target
    filtered = dict(target)
    for key, value in target.items():
        is_instance_key = key not in _NON_INSTANCE_KEYS and isinstance(value, Tensor) and value.ndim >= 1
        if is_instance_key and value.shape[0] == num_instances:
            filtered[key] = value[keep.to(value.device)]
    return filtered


def _resize_nearest(tensor: Tensor, size: tuple[int, int]) -> Tensor:
    # Pixel-centre nearest neighbour (PyTorch "nearest-exact"): output i samples input floor((i + 0.5) * in / out).
    # Index gathering works for every dtype (bool masks, int64 label maps) and never invents a value.
    indices = []
    for dim, out_size in ((-2, size[0]), (-1, size[1])):
        in_size = tensor.shape[dim]
        positions = (torch.arange(out_size, dtype=torch.float64, device=tensor.device) + 0.5) * (in_size / out_size)
        indices.append(positions.floor().long().clamp_(max=in_size - 1))
    return tensor.index_select(-2, indices[0]).index_select(-1, indices[1])


def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if image.dtype == torch.uint8:
        return resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.to(image.dtype)


def _pad_bottom_right(tensor: Tensor, bottom: int, right: int, value: float) -> Tensor:
    height, width = tensor.shape[-2:]
    padded = tensor.new_full((*tensor.shape[:-2], height + bottom, width + right), value)
    padded[..., :height, :width] = tensor
    return padded


def _clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def resize_sample(image: Tensor, target: Target, size: tuple[int, int]) -> Sample:
    """Resize an image and its target to ``size = (height, width)`` pixels, not keeping the aspect ratio.

    The image keeps its dtype (bilinear, antialiased); masks and the label map use pixel-centre nearest neighbour;
    boxes are scaled and clipped; instances left empty are removed.
    """
    height, width = image.shape[-2:]
    out = dict(target)
    if "boxes" in out:
        scale_x, scale_y = size[1] / width, size[0] / height
        out["boxes"] = _clip_boxes(out["boxes"] * out["boxes"].new_tensor([scale_x, scale_y, scale_x, scale_y]), *size)
    for key in ("masks", "mask"):
        if key in out:
            out[key] = _resize_nearest(out[key], size)
    return _resize_image(image, size), remove_empty_instances(out)


def hflip_sample(image: Tensor, target: Target) -> Sample:
    """Mirror an image and its target left to right (box ``x1' = W - x2``, ``x2' = W - x1``)."""
    width = image.shape[-1]
    out = dict(target)
    if "boxes" in out:
        boxes = out["boxes"]
        out["boxes"] = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
    for key in ("masks", "mask"):
        if key in out:
            out[key] = out[key].flip(-1)
    return image.flip(-1), out


def crop_sample(image: Tensor, target: Target, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the window of ``height × width`` pixels at ``(top, left)`` from an image and its target.

    Boxes are shifted and clipped to the window; instances left empty are removed.

    Raises:
        ValueError: If the window does not lie inside the image.
    """
    image_height, image_width = image.shape[-2:]
    if top < 0 or left < 0 or height <= 0 or width <= 0 or top + height > image_height or left + width > image_width:
        raise ValueError(
            f"crop window (top={top}, left={left}, height={height}, width={width}) does not fit in an image of "
            f"size ({image_height}, {image_width}){_where(target)}"
        )
    out = dict(target)
    if "boxes" in out:
        out["boxes"] = _clip_boxes(out["boxes"] - out["boxes"].new_tensor([left, top, left, top]), height, width)
    for key in ("masks", "mask"):
        if key in out:
            out[key] = out[key][..., top : top + height, left : left + width]
    return image[..., top : top + height, left : left + width], remove_empty_instances(out)


def pad_sample(
    image: Tensor, target: Target, bottom: int, right: int, fill: float = 0, ignore_index: int = IGNORE_INDEX
) -> Sample:
    """Pad ``bottom`` rows and ``right`` columns; boxes are unchanged.

    New image pixels get ``fill`` (in the image's own units), label-map pixels ``ignore_index``, instance masks
    ``False``.
    """
    if bottom == 0 and right == 0:
        return image, dict(target)
    out = dict(target)
    if "masks" in out:
        out["masks"] = _pad_bottom_right(out["masks"], bottom, right, 0)
    if "mask" in out:
        out["mask"] = _pad_bottom_right(out["mask"], bottom, right, ignore_index)
    return _pad_bottom_right(image, bottom, right, fill), out


def _pad_to_at_least(image: Tensor, target: Target, size: tuple[int, int], fill: float, ignore_index: int) -> Sample:
    bottom, right = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    return pad_sample(image, target, bottom, right, fill, ignore_index)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(
            f"{name}: size must be a positive int or a (height, width) pair of positive ints, got {size!r}"
        )
    return pair[0], pair[1]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=generator).item())


class JointTransform:
    """Base class of the joint transforms: validates the sample, then applies ``_apply``.

    Subclasses set ``_repr_fields`` to the attribute names shown by ``repr``.
    """

    _repr_fields: tuple[str, ...] = ()

    def __call__(self, image: Tensor, target: Target) -> Sample:
        """Transform one ``(image, target)`` sample; returns a new target dict, the input is not modified.

        Raises:
            ValueError: If the image or a target entry has the wrong shape (see :func:`check_sample`).
        """
        height, width = check_sample(image, target, type(self).__name__)
        return self._apply(image, target, height, width)

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._repr_fields)
        return f"{type(self).__name__}({fields})"


class Compose:
    """Apply joint transforms in order.

    Args:
        transforms: Callables ``(image, target) -> (image, target)``.
    """

    def __init__(self, transforms: Sequence[TransformFn]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> Sample:
        """Apply every transform to ``(image, target)`` in order and return the result."""
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        body = "".join(f"\n    {transform!r}," for transform in self.transforms)
        return f"{type(self).__name__}([{body}\n])"


class ResizeShortestSide(JointTransform):
    """Resize so the short side has a given length, capping the long side (detectron2 ``ResizeShortestEdge``).

    Args:
        short_side: Target short-side length in pixels, or several, one picked uniformly at random per call.
        max_size: Upper bound on the long side in pixels; ``None`` for no bound.
        generator: RNG for the choice of short side; ``None`` uses torch's global RNG.
    """

    _repr_fields = ("short_sides", "max_size")

    def __init__(
        self, short_side: int | Sequence[int], max_size: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        sides = (short_side,) if isinstance(short_side, int) else tuple(short_side)
        if not sides or not all(isinstance(s, int) and s > 0 for s in sides):
            raise ValueError(f"ResizeShortestSide: short_side must be positive int(s), got {short_side!r}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"ResizeShortestSide: max_size must be positive or None, got {max_size}")
        self.short_sides = sides
        self.max_size = max_size
        self.generator = generator

    def output_size(self, height: int, width: int, short_side: int) -> tuple[int, int]:
        """Output ``(height, width)`` in pixels for an input of ``(height, width)`` and a chosen short side."""
        scale = short_side / min(height, width)
        if self.max_size is not None and max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        index = 0 if len(self.short_sides) == 1 else _randint(len(self.short_sides), self.generator)
        return resize_sample(image, target, self.output_size(height, width, self.short_sides[index]))


class Resize(JointTransform):
    """Resize to a fixed size, ignoring the aspect ratio.

    Args:
        size: Output ``(height, width)`` in pixels, or one int for a square.
    """

    _repr_fields = ("size",)

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "Resize")

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        return resize_sample(image, target, self.size)


class RandomHorizontalFlip(JointTransform):
    """Mirror left to right with probability ``p``.

    Args:
        p: Flip probability in ``[0, 1]``.
        generator: RNG; ``None`` uses torch's global RNG.
    """

    _repr_fields = ("p",)

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.generator = generator

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        if torch.rand(1, generator=self.generator).item() < self.p:
            return hflip_sample(image, target)
        return image, dict(target)


class RandomResizedCrop(JointTransform):
    """Crop a random area fraction and aspect ratio, then resize to ``size`` (Inception-style, torchvision semantics).

    Ten attempts draw an area fraction from ``scale`` and a log-uniform aspect ratio (w / h) from ``ratio``; if none
    fits, the largest centred crop with an aspect ratio clamped to ``ratio`` is used.

    Args:
        size: Output ``(height, width)`` in pixels, or one int for a square.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio, width / height.
        generator: RNG; ``None`` uses torch's global RNG.
    """

    _repr_fields = ("size", "scale", "ratio")

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomResizedCrop: scale must satisfy 0 < min <= max, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCrop: ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = _pair(size, "RandomResizedCrop")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.generator = generator

    def crop_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw a window ``(top, left, crop_height, crop_width)`` in pixels for an image of ``(height, width)``."""
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = height * width * _uniform(*self.scale, self.generator)
            aspect = math.exp(_uniform(*log_ratio, self.generator))
            crop_width = round(math.sqrt(area * aspect))
            crop_height = round(math.sqrt(area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = _randint(height - crop_height + 1, self.generator)
                left = _randint(width - crop_width + 1, self.generator)
                return top, left, crop_height, crop_width
        crop_height, crop_width = height, width
        if width / height < self.ratio[0]:
            crop_height = min(height, max(1, round(width / self.ratio[0])))
        elif width / height > self.ratio[1]:
            crop_width = min(width, max(1, round(height * self.ratio[1])))
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        image, target = crop_sample(image, target, *self.crop_window(height, width))
        return resize_sample(image, target, self.size)


class RandomCrop(JointTransform):
    """Random fixed-size crop for segmentation (mmseg ``RandomCrop`` semantics).

    An image smaller than ``size`` is first padded at the bottom/right (image with ``fill``, label map with
    ``ignore_index``, instance masks with ``False``), so the output is always exactly ``size``; this equals mmseg's
    crop followed by ``Pad``. With ``cat_max_ratio < 1`` and a ``mask`` label map present, up to ten new windows are
    drawn while the window's most frequent class covers ``>= cat_max_ratio`` of its non-ignored pixels or the window
    holds fewer than two classes; the last window drawn is used.

    Args:
        size: Crop ``(height, width)`` in pixels, or one int for a square.
        cat_max_ratio: Largest share one class may take of a crop; 1.0 disables the check.
        ignore_index: Label value excluded from the class count and used for padding.
        fill: Image value used for padding.
        generator: RNG; ``None`` uses torch's global RNG.
    """

    _repr_fields = ("size", "cat_max_ratio", "ignore_index", "fill")

    def __init__(
        self,
        size: int | Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        fill: float = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"RandomCrop: cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.size = _pair(size, "RandomCrop")
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.fill = fill
        self.generator = generator

    def _draw_offset(self, height: int, width: int) -> tuple[int, int]:
        return _randint(height - self.size[0] + 1, self.generator), _randint(width - self.size[1] + 1, self.generator)

    def _balanced_enough(self, window: Tensor) -> bool:
        values, counts = torch.unique(window, return_counts=True)
        counts = counts[values != self.ignore_index]
        return counts.numel() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        crop_height, crop_width = self.size
        image, target = _pad_to_at_least(image, target, self.size, self.fill, self.ignore_index)
        height, width = image.shape[-2:]
        top, left = self._draw_offset(height, width)
        if self.cat_max_ratio < 1.0 and "mask" in target:
            for _ in range(10):
                if self._balanced_enough(target["mask"][top : top + crop_height, left : left + crop_width]):
                    break
                top, left = self._draw_offset(height, width)
        return crop_sample(image, target, top, left, crop_height, crop_width)


class CenterCrop(JointTransform):
    """Crop the centre ``size`` window; an image smaller than ``size`` is first padded at the bottom/right.

    Args:
        size: Crop ``(height, width)`` in pixels, or one int for a square.
        fill: Image value used for padding.
        ignore_index: Label-map value used for padding.
    """

    _repr_fields = ("size",)

    def __init__(self, size: int | Sequence[int], fill: float = 0, ignore_index: int = IGNORE_INDEX) -> None:
        self.size = _pair(size, "CenterCrop")
        self.fill = fill
        self.ignore_index = ignore_index

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        image, target = _pad_to_at_least(image, target, self.size, self.fill, self.ignore_index)
        top, left = (image.shape[-2] - self.size[0]) // 2, (image.shape[-1] - self.size[1]) // 2
        return crop_sample(image, target, top, left, *self.size)


class PadToMultiple(JointTransform):
    """Pad at the bottom/right so height and width are multiples of ``divisor``; boxes are unchanged.

    Args:
        divisor: The multiple, in pixels.
        fill: Image value of the new pixels (in the image's own units: 0 after ``Normalize`` is the mean colour).
        ignore_index: Label-map value of the new pixels.
    """

    _repr_fields = ("divisor", "fill", "ignore_index")

    def __init__(self, divisor: int = 32, fill: float = 0, ignore_index: int = IGNORE_INDEX) -> None:
        if divisor <= 0:
            raise ValueError(f"PadToMultiple: divisor must be positive, got {divisor}")
        self.divisor = divisor
        self.fill = fill
        self.ignore_index = ignore_index

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        return pad_sample(image, target, -height % self.divisor, -width % self.divisor, self.fill, self.ignore_index)


class ToFloat(JointTransform):
    """Convert a uint8 image in ``[0, 255]`` to float32 in ``[0, 1]``; float images are cast to float32 unchanged."""

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        return (image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()), dict(target)


class Normalize(JointTransform):
    """Standardise channels: uint8 images are first scaled to ``[0, 1]``, then ``(x - mean) / std``.

    Float input is taken to be in ``[0, 1]`` already.

    Args:
        mean: Per-channel mean in ``[0, 1]`` units.
        std: Per-channel standard deviation in ``[0, 1]`` units, all positive.
    """

    _repr_fields = ("mean", "std")

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def _apply(self, image: Tensor, target: Target, height: int, width: int) -> Sample:
        if image.shape[0] != len(self.mean):
            raise ValueError(
                f"Normalize: image has {image.shape[0]} channels but mean/std have {len(self.mean)}{_where(target)}"
            )
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        mean = image.new_tensor(self.mean).view(-1, 1, 1)
        std = image.new_tensor(self.std).view(-1, 1, 1)
        return (image - mean) / std, dict(target)
