"""Draw instance predictions (masks, boxes, class names, scores) over images and save them as PNG (PIL only).

:func:`overlay_instances` draws one image; :func:`image_grid` tiles several; :func:`save_png` writes atomically.
Colours come from a fixed palette indexed by label, so a class keeps its colour across images and epochs::

    panel = overlay_instances(image, masks=pred["masks"], boxes=pred["boxes"], labels=pred["labels"],
                              scores=pred["scores"], class_names=["circle", "square", "triangle"])
    save_png(image_grid([panel]), "predictions.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from visionkit.utils.io import atomic_write

__all__ = ["PALETTE", "image_grid", "overlay_instances", "save_png", "to_uint8_image"]

#: RGB colours, one per label (cycled): the 10 "tab10" colours.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An RGB image as a ``(H, W, 3)`` uint8 array.

    Args:
        image: ``(3, H, W)`` tensor (float in ``[0, 1]`` or uint8) or ``(H, W, 3)`` array (float in ``[0, 1]`` or
            uint8). A single channel is repeated.

    Returns:
        ``(H, W, 3)`` uint8 array.

    Raises:
        ValueError: The shape is not an image.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim != 3:
            raise ValueError(f"expected a (C, H, W) image tensor, got shape {tuple(image.shape)}")
        image = image.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return array


def _as_numpy(value: torch.Tensor | np.ndarray | Sequence | None) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def overlay_instances(
    image: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None = None,
    boxes: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    scores: torch.Tensor | np.ndarray | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend instance masks into ``image`` and draw boxes with ``name score`` captions.

    Args:
        image: ``(3, H, W)`` tensor or ``(H, W, 3)`` array (see :func:`to_uint8_image`).
        masks: ``(K, H, W)`` or ``(K, 1, H, W)``: bool, or probabilities binarised at 0.5.
        boxes: ``(K, 4)`` xyxy in pixels.
        labels: ``(K,)`` contiguous labels (colour and caption); ``None`` colours instances by position.
        scores: ``(K,)`` confidences shown after the name.
        class_names: Caption per label; ``None`` shows the label number.
        alpha: Mask opacity in ``[0, 1]``.

    Returns:
        An RGB ``PIL.Image`` of the image's size.

    Raises:
        ValueError: Masks of another size than the image, or per-instance inputs of different lengths.
    """
    canvas = to_uint8_image(image).astype(np.float32)
    height, width = canvas.shape[:2]
    mask_array, box_array = _as_numpy(masks), _as_numpy(boxes)
    label_array, score_array = _as_numpy(labels), _as_numpy(scores)
    if mask_array is not None and mask_array.ndim == 4:
        mask_array = mask_array[:, 0]
    counts = {len(a) for a in (mask_array, box_array, label_array, score_array) if a is not None}
    if len(counts) > 1:
        raise ValueError(f"masks, boxes, labels and scores must have one entry per instance, got lengths {counts}")
    count = counts.pop() if counts else 0
    if mask_array is not None and count and mask_array.shape[1:] != (height, width):
        raise ValueError(f"masks are {mask_array.shape[1:]} but the image is {(height, width)}")

    def color(index: int) -> tuple[int, int, int]:
        key = int(label_array[index]) if label_array is not None else index
        return PALETTE[key % len(PALETTE)]

    if mask_array is not None:
        binary = mask_array if mask_array.dtype == bool else mask_array > 0.5
        for index in range(count):
            canvas[binary[index]] = (1.0 - alpha) * canvas[binary[index]] + alpha * np.asarray(color(index))
    result = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    if box_array is None:
        return result
    draw = ImageDraw.Draw(result)
    for index in range(count):
        x1, y1, x2, y2 = (float(v) for v in box_array[index])
        draw.rectangle((x1, y1, x2, y2), outline=color(index), width=1)
        parts = []
        if label_array is not None:
            label = int(label_array[index])
            parts.append(
                class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
            )
        if score_array is not None:
            parts.append(f"{float(score_array[index]):.2f}")
        if parts:
            text = " ".join(parts)
            left, top, right, bottom = draw.textbbox((x1, y1), text)
            y_text = max(y1 - (bottom - top) - 2, 0)
            draw.rectangle((x1, y_text, x1 + (right - left) + 2, y_text + (bottom - top) + 2), fill=color(index))
            draw.text((x1 + 1, y_text), text, fill=(255, 255, 255))
    return result


def image_grid(images: Sequence[Image.Image], columns: int = 4, padding: int = 2) -> Image.Image:
    """Tile images row by row on a white canvas, each in a cell as large as the largest image.

    Args:
        images: At least one image.
        columns: Images per row (fewer if there are fewer images).
        padding: Pixels between cells and around the grid.

    Returns:
        The grid as an RGB ``PIL.Image``.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new(
        "RGB", (columns * (cell_w + padding) + padding, rows * (cell_h + padding) + padding), (255, 255, 255)
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (padding + column * (cell_w + padding), padding + row * (cell_h + padding)))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG atomically (:func:`visionkit.utils.atomic_write`); parent folders are created.

    Args:
        image: The image.
        path: Destination file.

    Returns:
        The written path.
    """
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
