"""Collate functions: batch layout, padding values, and errors on inconsistent samples."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from visionkit.data import collate_classification, collate_detection, collate_segmentation, collate_unlabeled


def seg_sample(height: int, width: int, label: int, image_id: int, dtype: torch.dtype = torch.uint8):
    image = torch.full((3, height, width), 7, dtype=dtype)
    mask = torch.full((height, width), label, dtype=torch.int64)
    return image, {"mask": mask, "image_id": image_id, "orig_size": (height * 2, width * 2)}


def test_collate_detection_keeps_lists_in_order():
    batch = [
        (
            torch.zeros(3, 4, 5),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1},
        ),
        (torch.ones(3, 6, 2), {"boxes": torch.ones(1, 4), "labels": torch.ones(1, dtype=torch.int64), "image_id": 2}),
    ]
    images, targets = collate_detection(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    assert [tuple(image.shape) for image in images] == [(3, 4, 5), (3, 6, 2)]
    assert [target["image_id"] for target in targets] == [1, 2]
    assert targets[1] is batch[1][1] and images[1] is batch[1][0]


def test_collate_segmentation_pads_to_largest():
    batch = [seg_sample(4, 5, 1, 10), seg_sample(6, 3, 2, 11)]
    images, target = collate_segmentation(batch)
    assert images.shape == (2, 3, 6, 5) and images.dtype == torch.uint8
    assert target["mask"].shape == (2, 6, 5) and target["mask"].dtype == torch.int64
    # sample 0: rows 4..5 padded; sample 1: columns 3..4 padded
    assert int(images[0, :, :4, :5].min()) == 7 and int(images[0, :, 4:].max()) == 0
    assert int(images[1, :, :, :3].min()) == 7 and int(images[1, :, :, 3:].max()) == 0
    assert target["mask"][0, :4].unique().tolist() == [1] and target["mask"][0, 4:].unique().tolist() == [255]
    assert target["mask"][1, :, :3].unique().tolist() == [2] and target["mask"][1, :, 3:].unique().tolist() == [255]
    assert target["image_id"] == [10, 11]
    assert target["orig_size"] == [(8, 10), (12, 6)]
    assert target["image_size"] == [(4, 5), (6, 3)]


def test_collate_segmentation_float_images_and_custom_fill():
    batch = [seg_sample(2, 2, 0, 0, torch.float32), seg_sample(3, 2, 0, 1, torch.float32)]
    images, target = collate_segmentation(batch, fill=-1.0, ignore_index=100)
    assert images.dtype == torch.float32
    assert images[0, :, 2].unique().tolist() == [-1.0]
    assert target["mask"][0, 2].unique().tolist() == [100]


def test_collate_segmentation_missing_or_mismatched_label_map():
    image, target = seg_sample(4, 4, 1, 5)
    with pytest.raises(ValueError, match=r"sample 1 \(image_id=6\) needs a label map 'mask' of shape \(4, 4\), got no"):
        collate_segmentation([(image, target), (image, {"image_id": 6})])
    with pytest.raises(ValueError, match=r"needs a label map 'mask' of shape \(4, 4\), got \(4, 3\)"):
        collate_segmentation([(image, {"mask": torch.zeros(4, 3, dtype=torch.int64)})])


def test_collate_classification_stacks():
    batch = [(torch.full((3, 4, 4), float(i)), {"label": torch.tensor(i), "image_id": 100 + i}) for i in range(3)]
    batch.append((torch.full((3, 4, 4), 3.0), {"label": 3, "image_id": 103}))  # a plain int label is accepted
    images, target = collate_classification(batch)
    assert images.shape == (4, 3, 4, 4)
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert target["label"].dtype == torch.int64 and target["label"].tolist() == [0, 1, 2, 3]
    assert target["image_id"] == [100, 101, 102, 103]


@pytest.mark.parametrize("label", [None, torch.tensor(1.5), torch.tensor([1, 2]), 2.0])
def test_collate_classification_rejects_bad_labels(label):
    target = {"image_id": 4} if label is None else {"label": label, "image_id": 4}
    with pytest.raises(ValueError, match=r"collate_classification: sample 0 \(image_id=4\) needs an integer scalar"):
        collate_classification([(torch.zeros(3, 2, 2), target)])


def test_collate_classification_rejects_different_sizes():
    batch = [(torch.zeros(3, 4, 4), {"label": 0}), (torch.zeros(3, 4, 5), {"label": 1})]
    with pytest.raises(ValueError, match=r"sample 1 has size \(3, 4, 5\) but sample 0 has \(3, 4, 4\)"):
        collate_classification(batch)


def test_collate_unlabeled_gathers_every_key():
    batch = [(torch.zeros(3, 2, 2), {"image_id": i, "path": f"/data/{i}.jpg"}) for i in range(2)]
    images, target = collate_unlabeled(batch)
    assert images.shape == (2, 3, 2, 2)
    assert target == {"image_id": [0, 1], "path": ["/data/0.jpg", "/data/1.jpg"]}


@pytest.mark.parametrize(
    "collate", [collate_detection, collate_segmentation, collate_classification, collate_unlabeled]
)
def test_mismatched_channels_raise(collate):
    batch = [seg_sample(4, 4, 1, 1), (torch.zeros(1, 4, 4, dtype=torch.uint8), {"mask": torch.zeros(4, 4).long()})]
    batch[0][1]["label"] = 0
    batch[1][1]["label"] = 1
    with pytest.raises(ValueError, match=rf"{collate.__name__}: sample 1 has 1 channels but sample 0 has 3"):
        collate(batch)


@pytest.mark.parametrize(
    "collate", [collate_detection, collate_segmentation, collate_classification, collate_unlabeled]
)
def test_mismatched_dtypes_and_empty_batches_raise(collate):
    batch = [seg_sample(4, 4, 1, 1), seg_sample(4, 4, 1, 2, torch.float32)]
    with pytest.raises(
        ValueError, match=r"sample 1 \(image_id=2\) has dtype torch.float32 but sample 0 has torch.uint8"
    ):
        collate(batch)
    with pytest.raises(ValueError, match=rf"{collate.__name__}: got an empty batch"):
        collate([])


def test_collate_in_a_dataloader():
    samples = [seg_sample(3 + i, 5 - i, i, i) for i in range(4)]
    batches = list(DataLoader(samples, batch_size=2, collate_fn=collate_segmentation))
    assert [tuple(images.shape) for images, _ in batches] == [(2, 3, 4, 5), (2, 3, 6, 3)]
    assert [target["image_id"] for _, target in batches] == [[0, 1], [2, 3]]


def test_collate_segmentation_size_divisor():
    images, target = collate_segmentation([seg_sample(6, 5, 1, 0), seg_sample(3, 9, 2, 1)], size_divisor=4)
    assert images.shape == (2, 3, 8, 12) and target["mask"].shape == (2, 8, 12)
    assert target["image_size"] == [(6, 5), (3, 9)]
    assert target["mask"][0, 6:].unique().tolist() == [255] and target["mask"][0, :, 5:].unique().tolist() == [255]
    with pytest.raises(ValueError, match="collate_segmentation: size_divisor must be >= 1, got 0"):
        collate_segmentation([seg_sample(2, 2, 0, 0)], size_divisor=0)
