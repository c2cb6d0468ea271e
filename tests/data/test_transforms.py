"""Joint transforms: hand-worked geometry, label-map values, padding, determinism, instance removal, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from visionkit.data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    Normalize,
    PadToMultiple,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ResizeShortestSide,
    ToFloat,
    classification_transforms,
    detection_transforms,
    segmentation_transforms,
)
from visionkit.data.transforms import crop_sample, remove_empty_instances


def rect_mask(height: int, width: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    x1, y1, x2, y2 = box
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def tight_box(mask: torch.Tensor) -> list[int]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def detection_sample(height: int, width: int, boxes: list[tuple[int, int, int, int]]):
    image = torch.arange(3 * height * width, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, height, width)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        "labels": torch.arange(len(boxes), dtype=torch.int64),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        "masks": torch.stack([rect_mask(height, width, b) for b in boxes])
        if boxes
        else torch.zeros(0, height, width, dtype=torch.bool),
        "image_id": 7,
        "orig_size": (height, width),
    }
    return image, target


# ---------------------------------------------------------------------------------------------- hand-worked geometry
def test_flip_hand_worked():
    image, target = detection_sample(4, 6, [(1, 0, 3, 2)])
    out_image, out = RandomHorizontalFlip(p=1.0)(image, target)
    # x1' = W - x2 = 6 - 3, x2' = W - x1 = 6 - 1
    assert out["boxes"].tolist() == [[3.0, 0.0, 5.0, 2.0]]
    assert tight_box(out["masks"][0]) == [3, 0, 5, 2]
    assert torch.equal(out_image, image.flip(-1))
    assert out["image_id"] == 7 and out["orig_size"] == (4, 6)
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 0.0, 3.0, 2.0]])), "input target must not be modified"


def test_flip_probability_zero_is_identity():
    image, target = detection_sample(4, 6, [(1, 0, 3, 2)])
    out_image, out = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])


def test_resize_shortest_side_integer_factor_hand_worked():
    image, target = detection_sample(4, 6, [(1, 1, 3, 2)])
    out_image, out = ResizeShortestSide(8)(image, target)
    assert out_image.shape == (3, 8, 12)
    assert out["boxes"].tolist() == [[2.0, 2.0, 6.0, 4.0]]
    # An integer upscale with pixel-centre nearest neighbour repeats every pixel exactly twice.
    expected_mask = target["masks"][0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(out["masks"][0], expected_mask)


@pytest.mark.parametrize(
    ("size", "short_side", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        ((300, 1000), 800, 1333, (400, 1333)),  # long side capped: scale 1.333, 300 * 1.333 = 399.9
        ((640, 480), 512, None, (683, 512)),
    ],
)
def test_resize_shortest_side_output_size(size, short_side, max_size, expected):
    assert ResizeShortestSide(short_side, max_size).output_size(*size, short_side) == expected


def test_resize_non_integer_factor_mask_matches_box_within_one_pixel():
    image, target = detection_sample(23, 37, [(3, 4, 20, 17), (25, 2, 36, 22)])
    _, out = Resize((31, 19))(image, target)
    for box, mask in zip(out["boxes"].tolist(), out["masks"], strict=True):
        assert max(abs(a - b) for a, b in zip(tight_box(mask), box, strict=True)) <= 1.0


def test_crop_hand_worked_and_instance_removal():
    # instance 0 overlaps the window; instance 1 lies entirely outside it.
    image, target = detection_sample(10, 10, [(2, 2, 8, 6), (0, 8, 2, 10)])
    out_image, out = crop_sample(image, target, top=3, left=4, height=5, width=5)
    assert out_image.shape == (3, 5, 5)
    assert torch.equal(out_image, image[:, 3:8, 4:9])
    assert out["boxes"].tolist() == [[0.0, 0.0, 4.0, 3.0]]
    assert tight_box(out["masks"][0]) == [0, 0, 4, 3]
    assert out["labels"].tolist() == [0]
    assert out["iscrowd"].tolist() == [0]
    assert out["masks"].shape == (1, 5, 5)


def test_crop_outside_image_raises():
    image, target = detection_sample(10, 10, [(2, 2, 8, 6)])
    with pytest.raises(ValueError, match=r"crop window .* does not fit in an image of size \(10, 10\) \(image_id=7\)"):
        crop_sample(image, target, top=6, left=0, height=5, width=5)


def test_remove_empty_instances_uses_box_size_and_mask():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 1:3, 1:3] = True  # instance 2 keeps an empty mask
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 0.5, 1.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0]]),
        "labels": torch.tensor([5, 6, 7]),
        "masks": masks,
        "scores": torch.tensor([0.1, 0.2, 0.3]),
        "image_id": 3,
    }
    out = remove_empty_instances(target)
    assert out["labels"].tolist() == [6]  # 0: box 0.5 px wide; 2: empty mask
    assert out["scores"].tolist() == pytest.approx([0.2])
    assert out["boxes"].tolist() == [[1.0, 1.0, 3.0, 3.0]]
    assert torch.equal(out["masks"], masks[1:2])
    assert out["image_id"] == 3


def test_label_map_resize_keeps_only_its_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([0, 3, 7, 255])
    label_map = values[torch.randint(0, 4, (29, 41), generator=generator)]
    image = torch.zeros(3, 29, 41, dtype=torch.uint8)
    for size in [(13, 17), (64, 80), (29, 100), (7, 7)]:
        _, out = Resize(size)(image, {"mask": label_map})
        assert out["mask"].dtype == torch.int64
        assert out["mask"].shape == size
        assert set(out["mask"].unique().tolist()) <= {0, 3, 7, 255}
    _, out = Resize((58, 82))(image, {"mask": label_map})
    assert torch.equal(out["mask"], label_map.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_image_resize_matches_torchvision_antialiased_bilinear():
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=generator)
    for size in [(18, 26), (80, 111)]:
        ours, _ = Resize(size)(image, {})
        reference = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert ours.dtype == torch.uint8
        assert (ours.int() - reference.int()).abs().max() <= 1
        float_ours, _ = Resize(size)(image.float() / 255, {})
        assert float_ours.dtype == torch.float32
        assert (float_ours * 255 - reference.float()).abs().max() <= 1.0


def test_pad_to_multiple_keeps_boxes_and_pads_label_map_with_ignore():
    image, target = detection_sample(30, 40, [(3, 4, 20, 17)])
    target["mask"] = torch.ones(30, 40, dtype=torch.int64)
    out_image, out = PadToMultiple(32)(image, target)
    assert out_image.shape == (3, 32, 64)
    assert torch.equal(out_image[:, :30, :40], image)
    assert int(out_image[:, 30:].sum()) == 0 and int(out_image[:, :, 40:].sum()) == 0
    assert torch.equal(out["boxes"], target["boxes"])
    assert torch.equal(out["mask"][:30, :40], target["mask"])
    assert set(out["mask"][30:].unique().tolist()) == {255} and set(out["mask"][:, 40:].unique().tolist()) == {255}
    assert not out["masks"][:, 30:].any() and not out["masks"][:, :, 40:].any()
    assert tight_box(out["masks"][0]) == [3, 4, 20, 17]


def test_random_crop_pads_small_images_to_crop_size():
    image = torch.full((3, 20, 24), 9, dtype=torch.uint8)
    label_map = torch.full((20, 24), 4, dtype=torch.int64)
    out_image, out = RandomCrop(32)(image, {"mask": label_map})
    assert out_image.shape == (3, 32, 32) and out["mask"].shape == (32, 32)
    assert torch.equal(out_image[:, :20, :24], image) and int(out_image[:, 20:].sum()) == 0
    assert torch.equal(out["mask"][:20, :24], label_map)
    assert set(out["mask"][20:].unique().tolist()) == {255}


def test_random_crop_cat_max_ratio_resamples_unbalanced_windows():
    # Columns 0..49 are class 1; columns 50..99 alternate classes 1 and 2. A 20×20 window has its largest class below
    # 75% only if it starts at column 41 or later (40 of the 81 offsets), so about half of all first draws fail.
    label_map = torch.ones(20, 100, dtype=torch.int64)
    label_map[:, 51::2] = 2
    image = torch.zeros(3, 20, 100, dtype=torch.uint8)

    def balanced(window: torch.Tensor) -> bool:
        counts = torch.bincount(window.flatten(), minlength=3)[1:]
        return bool((counts > 0).all()) and float(counts.max() / counts.sum()) < 0.75

    checked = RandomCrop(20, cat_max_ratio=0.75, generator=torch.Generator().manual_seed(0))
    unchecked = RandomCrop(20, generator=torch.Generator().manual_seed(0))
    checked_ok = sum(balanced(checked(image, {"mask": label_map})[1]["mask"]) for _ in range(60))
    unchecked_ok = sum(balanced(unchecked(image, {"mask": label_map})[1]["mask"]) for _ in range(60))
    assert 15 <= unchecked_ok <= 45  # without the check about half the windows are unbalanced
    assert checked_ok >= 58  # with up to ten redraws (failure chance ~0.5**11 each) nearly all are balanced


def test_random_crop_cat_max_ratio_ignores_ignore_index():
    # A 2x5 label map and 2x4 crops: the only offsets are left = 0 and left = 1 (top is always 0).
    #   row 0: 2 255 1 1 255
    #   row 1: 2 255 1 2 255
    # Window 0 (columns 0..3): class 1 x3, class 2 x3, ignore x2 -> real shares 3/6 = 0.5 < 0.75: balanced.
    # Window 1 (columns 1..4): class 1 x3, class 2 x1, ignore x4 -> real shares 3/4 = 0.75, not < 0.75: rejected.
    # Counting the ignore pixels would accept window 1 instead: as a category, the largest share is 4/8 = 0.5; in
    # the denominator only, class 1 has 3/8 = 0.375. So a correct crop picks window 0 unless all 11 draws (first + 10
    # redraws) land on window 1 (chance 2 ** -11), while a crop counting ignore pixels keeps its first draw: window 1
    # half of the time.
    label_map = torch.tensor([[2, 255, 1, 1, 255], [2, 255, 1, 2, 255]], dtype=torch.int64)
    image = torch.arange(10, dtype=torch.uint8).reshape(1, 2, 5).expand(3, 2, 5).clone()
    crop = RandomCrop((2, 4), cat_max_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert crop._balanced_enough(label_map[:, 0:4]) and not crop._balanced_enough(label_map[:, 1:5])
    windows = []
    for _ in range(40):
        out_image, out = crop(image, {"mask": label_map})
        windows.append(int(out_image[0, 0, 0]))  # the left offset: column values are 0..4 in row 0
        assert torch.equal(out["mask"], label_map[:, windows[-1] : windows[-1] + 4])
    assert windows == [0] * 40
    # The case discriminates: without the check (first draw kept) window 1 comes up about half of the time.
    unchecked = RandomCrop((2, 4), generator=torch.Generator().manual_seed(0))
    first_draws = [int(unchecked(image, {"mask": label_map})[0][0, 0, 0]) for _ in range(40)]
    assert 10 <= first_draws.count(1) <= 30


def test_random_resized_crop_fallback_is_centre_crop():
    # Squares of >= 90% of a 10×100 image cannot fit: the fallback is the centred 10×10 square.
    crop = RandomResizedCrop(10, scale=(0.9, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert crop.crop_window(10, 100) == (0, 45, 10, 10)


def test_center_crop_hand_worked():
    image, target = detection_sample(10, 12, [(0, 0, 3, 3), (4, 3, 8, 7)])
    out_image, out = CenterCrop((6, 6))(image, target)
    assert torch.equal(out_image, image[:, 2:8, 3:9])
    # The window is rows 2..7, columns 3..8: instance 0 (columns 0..2) falls outside and is removed.
    assert out["boxes"].tolist() == [[1.0, 1.0, 5.0, 5.0]]
    assert out["labels"].tolist() == [1]
    assert tight_box(out["masks"][0]) == [1, 1, 5, 5]


# --------------------------------------------------------------------------------------------------- consistency
@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(12, 48),
    width=st.integers(12, 48),
    rect=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    seed=st.integers(0, 2**31),
    pipeline=st.sampled_from(["detection", "resized_crop", "crop", "resize"]),
)
def test_mask_tight_box_matches_transformed_box(height, width, rect, seed, pipeline):
    x1, x2 = sorted((round(rect[0] * (width - 2)), round(rect[2] * (width - 2))))
    y1, y2 = sorted((round(rect[1] * (height - 2)), round(rect[3] * (height - 2))))
    image, target = detection_sample(height, width, [(x1, y1, x2 + 2, y2 + 2)])
    generator = torch.Generator().manual_seed(seed)
    transform = {
        "detection": detection_transforms(
            True, short_side=29, max_size=61, train_short_sides=[17, 29], generator=generator
        ),
        "resized_crop": Compose(
            [RandomResizedCrop((21, 15), generator=generator), RandomHorizontalFlip(generator=generator)]
        ),
        "crop": RandomCrop((10, 11), generator=generator),
        "resize": Resize((height * 2 + 1, width // 2 + 3)),
    }[pipeline]
    out_image, out = transform(image, target)
    assert out["boxes"].shape[0] == out["masks"].shape[0] == out["labels"].shape[0] == out["iscrowd"].shape[0]
    assert out["masks"].shape[1:] == out_image.shape[1:]
    for box, mask in zip(out["boxes"].tolist(), out["masks"], strict=True):
        assert 0 <= box[0] < box[2] <= out_image.shape[2] and 0 <= box[1] < box[3] <= out_image.shape[1]
        assert max(abs(a - b) for a, b in zip(tight_box(mask), box, strict=True)) <= 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda g: RandomResizedCrop(16, generator=g),
        lambda g: RandomCrop(12, cat_max_ratio=0.75, generator=g),
        lambda g: RandomHorizontalFlip(generator=g),
        lambda g: ResizeShortestSide([10, 14, 18, 22], generator=g),
        lambda g: segmentation_transforms(True, crop_size=16, short_side=24, generator=g),
    ],
)
def test_same_seed_same_output(make):
    image, target = detection_sample(30, 41, [(3, 4, 20, 17), (22, 5, 40, 29)])
    target["mask"] = (torch.arange(30 * 41).view(30, 41) % 5).long()

    def run(seed: int) -> list[tuple[torch.Tensor, dict]]:
        transform = make(torch.Generator().manual_seed(seed))
        return [transform(image, target) for _ in range(6)]

    first, again, other = run(0), run(0), run(1)
    for (a_image, a), (b_image, b) in zip(first, again, strict=True):
        assert (
            torch.equal(a_image, b_image) and torch.equal(a["mask"], b["mask"]) and torch.equal(a["boxes"], b["boxes"])
        )
    assert any(not torch.equal(a["mask"], c["mask"]) for (_, a), (_, c) in zip(first, other, strict=True))


def test_global_rng_is_used_without_generator():
    image, target = detection_sample(30, 41, [(3, 4, 20, 17)])
    crop = RandomResizedCrop(16)
    torch.manual_seed(123)
    first = crop(image, target)[1]["boxes"]
    torch.manual_seed(123)
    assert torch.equal(crop(image, target)[1]["boxes"], first)


# --------------------------------------------------------------------------------------------- value transforms
def test_normalize_uint8_matches_torchvision():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out, _ = Normalize(CLIP_MEAN, CLIP_STD)(image, {"label": torch.tensor(1)})
    reference = TF.normalize(image.float() / 255, list(CLIP_MEAN), list(CLIP_STD))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)
    white, _ = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(torch.full((3, 1, 1), 255, dtype=torch.uint8), {})
    assert white.flatten().tolist() == [2.0, 2.0, 2.0]  # (1 - 0.5) / 0.25


def test_to_float_scales_uint8_and_keeps_floats():
    out, _ = ToFloat()(torch.tensor([[[0, 51, 255]]], dtype=torch.uint8).expand(3, 1, 3), {})
    assert out.dtype == torch.float32 and out[0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    already = torch.rand(3, 2, 2, dtype=torch.float64)
    out, _ = ToFloat()(already, {})
    assert out.dtype == torch.float32 and torch.allclose(out.double(), already)


def test_classification_target_passes_through():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    target = {"label": torch.tensor(2), "image_id": 11}
    for train in (True, False):
        out_image, out = classification_transforms(train, image_size=32)(image, target)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out == target and out is not target


def test_classification_eval_resizes_then_centre_crops():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out, _ = classification_transforms(False, image_size=224)(image, {})
    resized = TF.resize(image, [256, 341], antialias=True)  # short side floor(224 / 0.875) = 256
    expected = TF.normalize(resized[:, 16:240, 58:282].float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert (out - expected).abs().max() <= 1.01 / 255 / min(IMAGENET_STD)


def test_segmentation_eval_pads_to_divisor():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    label_map = torch.randint(0, 150, (50, 70))
    out_image, out = segmentation_transforms(False, short_side=40, max_size=100)(image, {"mask": label_map})
    assert out_image.shape == (3, 64, 64)  # resized to (40, 56), padded to multiples of 32
    assert set(out["mask"][40:].unique().tolist()) == {255} and set(out["mask"][:, 56:].unique().tolist()) == {255}


def test_segmentation_train_short_sides_follow_mask2former():
    resize = segmentation_transforms(True, short_side=512).transforms[0]
    assert resize.short_sides == tuple(int(x * 0.1 * 512) for x in range(5, 21))


def test_detection_eval_output_is_unit_float():
    image = torch.full((3, 20, 30), 255, dtype=torch.uint8)
    out, _ = detection_transforms(False, short_side=40, max_size=100)(image, {})
    assert out.shape == (3, 40, 60) and out.dtype == torch.float32
    assert math.isclose(float(out.max()), 1.0) and math.isclose(float(out.min()), 1.0)


def test_repr():
    assert repr(Compose([ResizeShortestSide([640, 672], 1333), RandomHorizontalFlip(0.5)])) == (
        "Compose([\n"
        "    ResizeShortestSide(short_sides=(640, 672), max_size=1333),\n"
        "    RandomHorizontalFlip(p=0.5),\n"
        "])"
    )
    assert repr(RandomCrop(512, cat_max_ratio=0.75)) == (
        "RandomCrop(size=(512, 512), cat_max_ratio=0.75, ignore_index=255, fill=0)"
    )
    assert repr(Normalize()) == "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
    assert repr(PadToMultiple(16)) == "PadToMultiple(divisor=16, fill=0, ignore_index=255)"


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("image", "target", "error", "message"),
    [
        (torch.zeros(8, 8), {}, ValueError, r"ResizeShortestSide: image must be a \(C, H, W\) tensor, got \(8, 8\)"),
        (
            torch.zeros(3, 8, 8, dtype=torch.int32),
            {},
            TypeError,
            r"image must be uint8 or floating point, got torch.int32",
        ),
        (
            torch.zeros(3, 8, 8),
            {"boxes": torch.zeros(2, 5), "image_id": 4},
            ValueError,
            r"target\['boxes'\] must have shape \(N, 4\), got \(2, 5\) \(image_id=4\)",
        ),
        (
            torch.zeros(3, 8, 8),
            {"boxes": torch.zeros(1, 4), "masks": torch.zeros(1, 8, 9, dtype=torch.bool)},
            ValueError,
            r"target\['masks'\] must have shape \(N, 8, 8\) like the image, got \(1, 8, 9\)",
        ),
        (
            torch.zeros(3, 8, 8),
            {"boxes": torch.zeros(2, 4), "masks": torch.zeros(1, 8, 8, dtype=torch.bool)},
            ValueError,
            r"target\['masks'\] has 1 instances, boxes 2",
        ),
        (
            torch.zeros(3, 8, 8),
            {"mask": torch.zeros(8, 7, dtype=torch.int64)},
            ValueError,
            r"target\['mask'\] must have shape \(8, 8\) like the image, got \(8, 7\)",
        ),
        (
            torch.zeros(3, 8, 8),
            {"boxes": torch.zeros(2, 4), "labels": torch.zeros(3, dtype=torch.int64)},
            ValueError,
            r"target\['labels'\] has shape \(3,\) but there are 2 instances",
        ),
    ],
)
def test_wrong_shapes_raise(image, target, error, message):
    with pytest.raises(error, match=message):
        ResizeShortestSide(16)(image, target)


def test_normalize_channel_mismatch_raises():
    with pytest.raises(ValueError, match=r"Normalize: image has 1 channels but mean/std have 3 \(image_id=2\)"):
        Normalize()(torch.zeros(1, 4, 4), {"image_id": 2})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ResizeShortestSide([]), r"short_side must be positive int\(s\), got \[\]"),
        (lambda: ResizeShortestSide(0), r"short_side must be positive int\(s\), got 0"),
        (lambda: Resize((3, 4, 5)), r"Resize: size must be a positive int or a \(height, width\) pair"),
        (lambda: RandomHorizontalFlip(1.5), r"p must be in \[0, 1\], got 1.5"),
        (lambda: RandomCrop(8, cat_max_ratio=0.0), r"cat_max_ratio must be in \(0, 1\], got 0.0"),
        (lambda: RandomResizedCrop(8, scale=(0.5, 0.1)), r"scale must satisfy 0 < min <= max"),
        (lambda: Normalize((0.5,), (0.0,)), r"std must be positive"),
        (lambda: PadToMultiple(0), r"divisor must be positive, got 0"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
