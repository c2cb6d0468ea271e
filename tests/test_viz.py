"""visionkit.viz: mask blending, boxes and captions, grids, atomic PNG writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.viz import PALETTE, image_grid, overlay_instances, save_png, to_uint8_image


def test_to_uint8_image_from_float_tensor_and_gray_array():
    image = torch.zeros(3, 2, 2)
    image[0] = 1.0
    image[1, 0, 0] = 0.5
    array = to_uint8_image(image)
    assert array.shape == (2, 2, 3) and array.dtype == np.uint8
    assert array[0, 0].tolist() == [255, 128, 0]  # 0.5 * 255 = 127.5 rounds to 128
    assert to_uint8_image(np.full((2, 3), 7, dtype=np.uint8)).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="image"):
        to_uint8_image(torch.zeros(2, 3))


def test_masks_are_blended_with_the_label_colour():
    image = torch.zeros(3, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 4:] = True
    result = np.asarray(overlay_instances(image, masks=masks, labels=[0, 2], alpha=0.5))
    # Black background, 50 % opacity: half the palette colour, rounded.
    assert result[0, 0].tolist() == [round(c / 2) for c in PALETTE[0]]
    assert result[7, 7].tolist() == [round(c / 2) for c in PALETTE[2]]
    assert result[0, 7].tolist() == [0, 0, 0]
    probabilities = masks[:, None].float() * 0.9  # (K, 1, H, W) probabilities are binarised at 0.5
    assert np.array_equal(np.asarray(overlay_instances(image, masks=probabilities, labels=[0, 2])), result)


def test_boxes_and_captions_are_drawn():
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 35.0]])
    result = np.asarray(
        overlay_instances(image, boxes=boxes, labels=[1], scores=[0.9], class_names=["circle", "square"])
    )
    assert result[35, 30].tolist() == list(PALETTE[1])  # bottom edge of the box
    assert result[27, 30].tolist() == [255, 255, 255]  # inside the box: untouched
    assert (result[:20] != 255).any()  # the caption sits above the box


def test_input_checks():
    with pytest.raises(ValueError, match="one entry per instance"):
        overlay_instances(torch.zeros(3, 4, 4), boxes=torch.zeros(2, 4), labels=[0])
    with pytest.raises(ValueError, match="masks are"):
        overlay_instances(torch.zeros(3, 4, 4), masks=torch.zeros(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])


def test_grid_layout_and_png_round_trip(tmp_path):
    tiles = [Image.new("RGB", (10, 6), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    grid = image_grid(tiles, columns=2, padding=2)
    assert grid.size == (2 * (10 + 2) + 2, 2 * (6 + 2) + 2)
    assert grid.getpixel((2, 2)) == (255, 0, 0) and grid.getpixel((14, 2)) == (0, 255, 0)
    assert grid.getpixel((2, 10)) == (0, 0, 255) and grid.getpixel((14, 10)) == (255, 255, 255)
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert path.exists() and list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with Image.open(path) as reloaded:
        assert reloaded.format == "PNG" and np.array_equal(np.asarray(reloaded), np.asarray(grid))
