import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from visionkit.data.image_io import read_image


def _write_pair(
    base: Path, split: str, stem: str, labels: np.ndarray, image_size: tuple[int, int] | None = None
) -> None:
    (base / "images" / split).mkdir(parents=True, exist_ok=True)
    (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
    height, width = image_size or labels.shape
    Image.new("RGB", (width, height), (10, 120, 30)).save(base / "images" / split / f"{stem}.jpg")
    Image.fromarray(labels.astype(np.uint8), mode="L").save(base / "annotations" / split / f"{stem}.png")


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    _write_pair(base, "training", "ADE_train_00000002", np.array([[0, 1, 150], [2, 0, 75]]))
    _write_pair(base, "training", "ADE_train_00000001", np.array([[5, 5, 5, 0]]))
    _write_pair(base, "validation", "ADE_val_00000001", np.array([[3]]))
    return base


def test_class_names_are_the_150_official_names() -> None:
    assert len(ADE20K_CLASSES) == 150
    assert len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert ADE20K_CLASSES[7] == "bed"  # mmseg spells it "bed " with a trailing space
    assert ADE20K_CLASSES[-1] == "flag"
    assert all(name == name.strip() for name in ADE20K_CLASSES)


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts_the_rest(ade_root: Path) -> None:
    dataset = ADE20KDataset(ade_root, split="training")
    assert len(dataset) == 2
    image, target = dataset[1]  # sorted by stem: ADE_train_00000001, ADE_train_00000002
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    assert target["mask"].dtype == torch.int64
    assert target["mask"].tolist() == [[255, 0, 149], [1, 255, 74]]
    assert target["image_id"] == 1
    assert target["orig_size"] == (2, 3)
    assert dataset.class_names == list(ADE20K_CLASSES)
    assert dataset.num_classes == 150


def test_without_reduce_zero_label_values_are_kept(ade_root: Path) -> None:
    dataset = ADE20KDataset(ade_root, split="training", reduce_zero_label=False)
    assert dataset[1][1]["mask"].tolist() == [[0, 1, 150], [2, 0, 75]]
    assert dataset.class_names[0] == "other"
    assert dataset.num_classes == 151


@pytest.mark.parametrize(("alias", "folder"), [("train", "training"), ("val", "validation")])
def test_split_aliases(ade_root: Path, alias: str, folder: str) -> None:
    by_alias, by_name = ADE20KDataset(ade_root, split=alias), ADE20KDataset(ade_root, split=folder)
    assert by_alias.split == folder
    assert [by_alias.get_image_info(i) for i in range(len(by_alias))] == [
        by_name.get_image_info(i) for i in range(len(by_name))
    ]


def test_unknown_split(ade_root: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown ADE20K split 'test'; expected one of"):
        ADE20KDataset(ade_root, split="test")


def test_get_image_info(ade_root: Path) -> None:
    info = ADE20KDataset(ade_root, split="val").get_image_info(0)
    assert info == {
        "image_id": 0,
        "stem": "ADE_val_00000001",
        "image_path": ade_root / "images" / "validation" / "ADE_val_00000001.jpg",
        "annotation_path": ade_root / "annotations" / "validation" / "ADE_val_00000001.png",
    }


def test_image_without_annotation_names_the_file(ade_root: Path) -> None:
    (ade_root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    image = ade_root / "images" / "training" / "ADE_train_00000002.jpg"
    with pytest.raises(
        FileNotFoundError, match=r"1 ADE20K image\(s\) have no annotation, e.g. " + re.escape(str(image))
    ):
        ADE20KDataset(ade_root)


def test_annotation_without_image_names_the_file(ade_root: Path) -> None:
    (ade_root / "images" / "training" / "ADE_train_00000001.jpg").unlink()
    label = ade_root / "annotations" / "training" / "ADE_train_00000001.png"
    with pytest.raises(
        FileNotFoundError, match=r"1 ADE20K annotation\(s\) have no image, e.g. " + re.escape(str(label))
    ):
        ADE20KDataset(ade_root)


def test_missing_folder_and_parent_root_hint(ade_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root should be the ADEChallengeData2016 folder itself"):
        ADE20KDataset(ade_root.parent)
    with pytest.raises(FileNotFoundError, match=re.escape(str(ade_root / "nowhere" / "images" / "training"))):
        ADE20KDataset(ade_root / "nowhere")


def test_value_above_150_raises_naming_the_file(ade_root: Path) -> None:
    _write_pair(ade_root, "validation", "ADE_val_00000002", np.array([[0, 151]]))
    dataset = ADE20KDataset(ade_root, split="val")
    label = ade_root / "annotations" / "validation" / "ADE_val_00000002.png"
    with pytest.raises(ValueError, match=re.escape(f"label map {label} holds value 151; ADE20K labels are 0..150")):
        dataset[1]


def test_size_mismatch_names_both_files(ade_root: Path) -> None:
    _write_pair(ade_root, "validation", "ADE_val_00000002", np.zeros((4, 5)), image_size=(4, 6))
    dataset = ADE20KDataset(ade_root, split="val")
    with pytest.raises(
        ValueError,
        match=r"ADE_val_00000002.jpg: decoded image size \(H, W\) = \(4, 6\) differs from the size \(4, 5\) that "
        r"its label map .*ADE_val_00000002.png gives",
    ):
        dataset[1]


def test_transforms_are_applied(ade_root: Path) -> None:
    def crop(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return image[:, :1], {**target, "mask": target["mask"][:1]}

    image, target = ADE20KDataset(ade_root, transforms=crop)[1]
    assert image.shape == (3, 1, 3)
    assert target["mask"].tolist() == [[255, 0, 149]]


def test_reads_the_synthetic_demo_set(demo_paths: dict[str, dict[str, Path]]) -> None:
    root = demo_paths["ade20k"]["root"]
    reduced = ADE20KDataset(root, split="training")
    raw = ADE20KDataset(root, split="training", reduce_zero_label=False)
    assert len(reduced) == len(list((root / "images" / "training").glob("*.jpg")))
    for index in range(len(reduced)):
        image, target = reduced[index]
        raw_mask = raw[index][1]["mask"]
        assert image.shape[1:] == target["mask"].shape
        assert set(raw_mask.unique().tolist()) <= {0, 1, 2, 3}
        assert torch.equal(target["mask"], torch.where(raw_mask == 0, 255, raw_mask - 1))


# ------------------------------------------------------------------------------------------------ EXIF orientation
EXIF_ORIENTATION = 0x0112


def _write_tagged_pair(base: Path, stem: str, stored_hw: tuple[int, int], label_hw: tuple[int, int]) -> Path:
    """A JPEG with EXIF orientation 6 whose stored pixels are ``stored_hw``, and a label map of ``label_hw``."""
    (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
    height, width = stored_hw
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    pixels[: height // 3, : width // 2] = (250, 20, 20)  # a red block at the top left of the stored pixels
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to view"
    path = base / "images" / "validation" / f"{stem}.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    labels = np.zeros(label_hw, dtype=np.uint8)
    labels[: label_hw[0] // 3, : label_hw[1] // 2] = 1  # drawn over the red block, in the label map's frame
    Image.fromarray(labels, mode="L").save(base / "annotations" / "validation" / f"{stem}.png")
    return path


def test_square_exif_rotated_image_is_read_as_stored_to_match_its_label_map(tmp_path: Path) -> None:
    # Upright or not, a square image has the label map's size: only the tag can tell, and ADE20K's label maps were
    # drawn on the stored pixels. Before, the image was rotated and silently misaligned with its labels.
    base = tmp_path / "ADEChallengeData2016"
    path = _write_tagged_pair(base, "ADE_val_00000001", (24, 24), (24, 24))
    _write_tagged_pair(base, "ADE_val_00000002", (24, 24), (24, 24))
    stored = read_image(path, apply_exif_orientation=False)
    dataset = ADE20KDataset(base, split="val")
    with pytest.warns(
        UserWarning, match=r"EXIF orientation 6: rotated 90° clockwise keeps the size \(24, 24\)"
    ) as seen:
        image, target = dataset[0]
        dataset[1]  # the second tagged image does not warn again: one warning per dataset
    assert len([w for w in seen if "exif_orientation" in str(w.message)]) == 1
    assert "ADE20KDataset(" in str(seen[0].message) and str(path) in str(seen[0].message)
    assert torch.equal(image, stored)
    red = (image[0] > 150) & (image[1] < 100)
    assert torch.equal(red, target["mask"] == 0)  # label 1 -> 0 after reduce_zero_label: aligned with the red block

    upright = ADE20KDataset(base, split="val", exif_orientation="upright")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice does not warn
        assert torch.equal(upright[0][0], read_image(path))
    assert not torch.equal(read_image(path), stored)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ADE20KDataset(base, split="val", exif_orientation="stored")[0][0], stored)


def test_non_square_exif_rotated_image_follows_its_label_map(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    as_stored = _write_tagged_pair(base, "ADE_val_00000001", (20, 32), (20, 32))  # labels on the stored pixels
    as_upright = _write_tagged_pair(base, "ADE_val_00000002", (20, 32), (32, 20))  # labels on the upright image
    neither = _write_tagged_pair(base, "ADE_val_00000003", (20, 32), (20, 20))
    dataset = ADE20KDataset(base, split="val")
    with pytest.warns(UserWarning, match=r"the EXIF orientation changes the size to \(32, 20\)"):
        assert torch.equal(dataset[0][0], read_image(as_stored, apply_exif_orientation=False))
    assert torch.equal(dataset[1][0], read_image(as_upright))
    label = base / "annotations" / "validation" / "ADE_val_00000003.png"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{neither}: decoded image size (H, W) = (20, 32) as stored, (32, 20) upright (EXIF orientation 6: "
            f"rotated 90° clockwise) differs from the size (20, 20) that its label map {label} gives"
        ),
    ):
        dataset[2]
    stored_only = ADE20KDataset(base, split="val", exif_orientation="stored")
    with pytest.raises(ValueError, match=r"the upright image matches it: use exif_orientation='auto' or 'upright'"):
        stored_only[1]
    with pytest.raises(ValueError, match=r"exif_orientation must be one of \('auto', 'stored', 'upright'\)"):
        ADE20KDataset(base, split="val", exif_orientation="sideways")  # type: ignore[arg-type]
