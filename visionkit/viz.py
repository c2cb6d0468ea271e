"""Draw instance predictions (masks, boxes, class names, scores) over images and save them as PNG (PIL only).

:func:`overlay_instances` draws one image; :func:`image_grid` tiles several; :func:`save_png` writes atomically.
:func:`heatmap_overlay` blends a coarse score map (e.g. per-token attention) over an image, :func:`patch_mask_overlay`
greys out the masked cells of a token grid, and :func:`with_caption` adds a line of text above or below a picture.
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

__all__ = [
    "PALETTE",
    "colorize",
    "heatmap_overlay",
    "image_grid",
    "overlay_instances",
    "patch_mask_overlay",
    "save_png",
    "to_uint8_image",
    "with_caption",
]

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

# matplotlib's "viridis" sampled at 0, 1/8, ..., 1 (perceptually uniform, readable in grey); linear in between.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
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


def colorize(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` to RGB colours of the viridis colour map (dark violet → yellow).

    Args:
        values: Array of any shape; values outside ``[0, 1]`` are clipped, NaN counts as 0.

    Returns:
        uint8 array of shape ``values.shape + (3,)``.
    """
    array = np.nan_to_num(np.asarray(_as_numpy(values), dtype=np.float64), nan=0.0)
    position = np.clip(array, 0.0, 1.0) * (len(_VIRIDIS_ANCHORS) - 1)
    low = np.minimum(np.floor(position).astype(np.int64), len(_VIRIDIS_ANCHORS) - 2)
    weight = (position - low)[..., None]
    colors = (1.0 - weight) * _VIRIDIS_ANCHORS[low] + weight * _VIRIDIS_ANCHORS[low + 1]
    return np.clip(np.rint(colors), 0, 255).astype(np.uint8)


def heatmap_overlay(
    image: torch.Tensor | np.ndarray,
    heat: torch.Tensor | np.ndarray,
    alpha: float = 0.6,
    normalize: bool = True,
    smooth: bool = False,
    desaturate: bool = True,
) -> Image.Image:
    """Blend a score map, coloured with :func:`colorize`, over an image.

    Args:
        image: ``(3, H, W)`` tensor or ``(H, W, 3)`` array (see :func:`to_uint8_image`).
        heat: ``(h, w)`` scores, e.g. one per token; resized to ``(H, W)``.
        alpha: Opacity of the colours in ``[0, 1]`` (1: the map alone).
        normalize: Min–max scale ``heat`` to ``[0, 1]`` first (a constant map becomes 0); otherwise it is clipped.
        smooth: Bilinear upsampling; the default (nearest) shows each score as a block over its cell.
        desaturate: Blend over the image's luminance (ITU-R 601 weights), so the image's own hues do not mix with
            the colour map's.

    Returns:
        An RGB ``PIL.Image`` of the image's size.

    Raises:
        ValueError: ``heat`` is not 2-D.
    """
    canvas = to_uint8_image(image).astype(np.float32)
    if desaturate:
        canvas = np.repeat(canvas @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32), 3, axis=2)
    scores = np.asarray(_as_numpy(heat), dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"heat must have shape (h, w), got {scores.shape}")
    if normalize:
        low, high = float(scores.min()), float(scores.max())
        scores = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
    height, width = canvas.shape[:2]
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    upsampled = np.asarray(Image.fromarray(scores, mode="F").resize((width, height), resample))
    blended = (1.0 - alpha) * canvas + alpha * colorize(upsampled).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def _cell_edges(cells: int, pixels: int) -> list[int]:
    """Pixel boundaries of ``cells`` equal cells across ``pixels`` (rounded when they do not divide evenly)."""
    return [round(index * pixels / cells) for index in range(cells + 1)]


# (cells, rgb) or (cells, rgb, line width): see patch_mask_overlay.
_Outline = (
    tuple[torch.Tensor | np.ndarray, tuple[int, int, int]] | tuple[torch.Tensor | np.ndarray, tuple[int, int, int], int]
)


def patch_mask_overlay(
    image: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    outlines: Sequence[_Outline] = (),
    fill: tuple[int, int, int] = (128, 128, 128),
    alpha: float = 0.7,
    hatch_spacing: int = 6,
    outline_width: int = 2,
) -> Image.Image:
    """Grey out and hatch the masked cells of a regular token grid laid over an image; optionally outline cells.

    Args:
        image: ``(3, H, W)`` tensor or ``(H, W, 3)`` array (see :func:`to_uint8_image`).
        mask: ``(h, w)`` bool, ``True`` = masked; cell ``(i, j)`` covers rows ``i·H/h .. (i+1)·H/h`` and the
            matching columns (pixels).
        outlines: ``(cells, rgb)`` or ``(cells, rgb, width)``: every ``True`` cell of the ``(h, w)`` bool ``cells``
            gets a rectangle of colour ``rgb`` (line ``width`` px, default ``outline_width``), inset by one pixel so
            neighbouring cells stay apart. Later entries are drawn on top.
        fill: Colour blended into masked cells.
        alpha: Opacity of ``fill`` in ``[0, 1]``.
        hatch_spacing: Pixels between the diagonal hatch lines of masked cells (0: no hatching).
        outline_width: Default line width of the outlines in pixels.

    Returns:
        An RGB ``PIL.Image`` of the image's size.

    Raises:
        ValueError: ``mask`` is not 2-D, or an outline grid differs from its shape.
    """
    canvas = to_uint8_image(image).astype(np.float32)
    cells = np.asarray(_as_numpy(mask)).astype(bool)
    if cells.ndim != 2:
        raise ValueError(f"mask must have shape (h, w), got {cells.shape}")
    height, width = canvas.shape[:2]
    rows, cols = _cell_edges(cells.shape[0], height), _cell_edges(cells.shape[1], width)
    # Expand the cell grid to pixels through the index of the cell each pixel row / column falls in.
    row_cell = np.searchsorted(rows, np.arange(height), side="right") - 1
    col_cell = np.searchsorted(cols, np.arange(width), side="right") - 1
    covered = cells[row_cell[:, None], col_cell[None, :]]
    fill_color = np.asarray(fill, dtype=np.float32)
    canvas[covered] = (1.0 - alpha) * canvas[covered] + alpha * fill_color
    if hatch_spacing > 0:
        diagonal = (np.arange(height)[:, None] + np.arange(width)[None, :]) % hatch_spacing == 0
        canvas[covered & diagonal] = 0.5 * fill_color
    result = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for selection, color, *line in outlines:
        chosen = np.asarray(_as_numpy(selection)).astype(bool)
        if chosen.shape != cells.shape:
            raise ValueError(f"outline cells have shape {chosen.shape} but the mask has {cells.shape}")
        for i, j in zip(*np.nonzero(chosen), strict=True):
            box = (cols[j] + 1, rows[i] + 1, cols[j + 1] - 2, rows[i + 1] - 2)
            draw.rectangle(box, outline=tuple(color), width=line[0] if line else outline_width)
    return result


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: float) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer single word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and draw.textlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def with_caption(
    image: Image.Image,
    text: str,
    position: str = "top",
    max_lines: int | None = None,
    padding: int = 2,
) -> Image.Image:
    """The image with a white band of black text above or below it, wrapped to the image's width.

    Args:
        image: The picture.
        text: Caption; a newline character starts a new line, long lines wrap at spaces.
        position: ``"top"`` or ``"bottom"``.
        max_lines: Keep at most this many lines (the last one then ends with ``...``); ``None``: all.
        padding: Pixels around the text.

    Returns:
        A new RGB image, as wide as ``image`` and taller by the band.

    Raises:
        ValueError: Unknown ``position`` or ``max_lines < 1``.
    """
    if position not in ("top", "bottom"):
        raise ValueError(f"position must be 'top' or 'bottom', got {position!r}")
    if max_lines is not None and max_lines < 1:
        raise ValueError(f"max_lines must be >= 1 or None, got {max_lines}")
    measure = ImageDraw.Draw(image)
    lines = _wrap(measure, text, image.width - 2 * padding)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and measure.textlength(lines[-1] + "...") > image.width - 2 * padding:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    line_height = measure.textbbox((0, 0), "Hg")[3] + 2
    band = len(lines) * line_height + 2 * padding
    result = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    top = band if position == "top" else 0
    result.paste(image.convert("RGB"), (0, top))
    draw = ImageDraw.Draw(result)
    text_top = padding if position == "top" else image.height + padding
    for index, line in enumerate(lines):
        draw.text((padding, text_top + index * line_height), line, fill=(0, 0, 0))
    return result
