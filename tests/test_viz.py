"""visionkit.viz: mask blending, boxes and captions, grids, atomic PNG writes, heat maps, token masks, captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.viz import (
    PALETTE,
    colorize,
    heatmap_overlay,
    image_grid,
    overlay_instances,
    patch_mask_overlay,
    save_png,
    to_uint8_image,
    with_caption,
)


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


def test_colorize_ends_and_clipping():
    colors = colorize(np.array([[-1.0, 0.0], [1.0, 2.0]]))
    assert colors.shape == (2, 2, 3) and colors.dtype == np.uint8
    assert colors[0, 0].tolist() == colors[0, 1].tolist() == [68, 1, 84]  # viridis dark end (clipped below)
    assert colors[1, 0].tolist() == colors[1, 1].tolist() == [253, 231, 37]  # bright end (clipped above)
    assert colorize(torch.tensor([0.5])).tolist() == [[33, 144, 141]]
    assert colorize(np.array([np.nan])).tolist() == [[68, 1, 84]]


def test_heatmap_overlay_upsamples_each_score_to_its_cell():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    heat = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # min-max scaled to 0, 1/3, 2/3, 1
    result = np.asarray(heatmap_overlay(image, heat, alpha=1.0))
    assert result.shape == (8, 8, 3)
    assert (result[:4, :4] == [68, 1, 84]).all() and (result[4:, 4:] == [253, 231, 37]).all()
    assert (result[:4, 4:] == colorize(np.array(1 / 3))).all()
    half = np.asarray(heatmap_overlay(np.full((4, 4, 3), 255, dtype=np.uint8), np.ones((2, 2)), alpha=0.5))
    assert half[0, 0].tolist() == [round((255 + 68) / 2), round((255 + 1) / 2), round((255 + 84) / 2)]  # constant: 0
    smooth = np.asarray(heatmap_overlay(image, heat, alpha=1.0, smooth=True))
    assert len({tuple(p) for p in smooth.reshape(-1, 3)}) > 4  # bilinear: values between the cells
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 200
    grey = round(0.299 * 200 / 2)  # luminance of the red, at 50 %, over viridis' dark end
    expected = [grey + round(68 / 2), grey + round(1 / 2), grey + round(84 / 2)]
    assert np.abs(np.asarray(heatmap_overlay(red, np.zeros((1, 1)), alpha=0.5))[0, 0] - expected).max() <= 1
    kept = np.asarray(heatmap_overlay(red, np.zeros((1, 1)), alpha=0.0, desaturate=False))
    assert kept[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        heatmap_overlay(image, np.zeros(4))


def test_patch_mask_overlay_greys_hatches_and_outlines_cells():
    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    mask = np.array([[True, False], [False, True]])
    outline = np.array([[True, False], [False, False]])
    plain = np.asarray(patch_mask_overlay(image, mask, fill=(0, 0, 0), alpha=0.5, hatch_spacing=0))
    assert plain[5, 5].tolist() == [100, 100, 100] and plain[15, 15].tolist() == [100, 100, 100]
    assert plain[5, 15].tolist() == [200, 200, 200] and plain[15, 5].tolist() == [200, 200, 200]
    hatched = np.asarray(patch_mask_overlay(image, mask, fill=(100, 100, 100), alpha=0.5, hatch_spacing=4))
    assert hatched[12, 12].tolist() == [50, 50, 50]  # (12 + 12) % 4 == 0: on a hatch line
    assert hatched[12, 13].tolist() == [150, 150, 150]
    assert hatched[12, 4].tolist() == [200, 200, 200]  # unmasked cells are never hatched
    drawn = np.asarray(patch_mask_overlay(image, mask, outlines=[(outline, (255, 0, 0))], hatch_spacing=0))
    assert drawn[1, 5].tolist() == [255, 0, 0] and drawn[5, 1].tolist() == [255, 0, 0]  # inset by one pixel
    assert drawn[0, 5].tolist() != [255, 0, 0] and drawn[11, 15].tolist() != [255, 0, 0]
    assert drawn[2, 5].tolist() == [255, 0, 0] and drawn[3, 5].tolist() != [255, 0, 0]  # default width 2
    wide = np.asarray(patch_mask_overlay(image, mask, outlines=[(outline, (0, 0, 255), 3)], hatch_spacing=0))
    assert wide[3, 5].tolist() == [0, 0, 255] and wide[4, 5].tolist() != [0, 0, 255]
    black = np.zeros((7, 7, 3), dtype=np.uint8)
    uneven = np.asarray(patch_mask_overlay(black, mask, fill=(90, 90, 90), alpha=1.0, hatch_spacing=0))
    assert uneven[3, 3].tolist() == [90, 90, 90] and uneven[4, 3].tolist() == [0, 0, 0]  # 7 px: cells of 4 and 3
    with pytest.raises(ValueError, match="outline cells"):
        patch_mask_overlay(image, mask, outlines=[(np.zeros((3, 3), dtype=bool), (0, 0, 0))])
    with pytest.raises(ValueError, match="mask must"):
        patch_mask_overlay(image, np.zeros(4, dtype=bool))


def test_with_caption_adds_a_wrapped_band():
    picture = Image.new("RGB", (60, 10), (255, 0, 0))
    one = with_caption(picture, "ab")
    assert one.width == 60 and one.height > 10
    assert one.getpixel((30, one.height - 1)) == (255, 0, 0)  # the picture sits under the band
    band = one.height - 10
    wrapped = with_caption(picture, "word " * 20)
    assert wrapped.width == 60 and (wrapped.height - 10) > 2 * (band - 4)  # several lines
    below = with_caption(picture, "word " * 20, position="bottom", max_lines=1)
    assert below.height == one.height and below.getpixel((30, 0)) == (255, 0, 0)
    assert with_caption(picture, "a\nb").height > one.height  # explicit line break
    with pytest.raises(ValueError, match="position"):
        with_caption(picture, "x", position="left")
    with pytest.raises(ValueError, match="max_lines"):
        with_caption(picture, "x", max_lines=0)
