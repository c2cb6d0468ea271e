import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.data.image_folder import ImageFolderClassification, UnlabeledImageFolder
from visionkit.data.image_io import ImageReadError


def _image(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train/{cat,dog}: nested files, an upper-case suffix, a hidden file and a non-image file."""
    _image(tmp_path / "train" / "dog" / "b.png", 10)
    _image(tmp_path / "train" / "dog" / "a.PNG", 20)
    _image(tmp_path / "train" / "cat" / "sub" / "z.jpg", 30)
    _image(tmp_path / "train" / "cat" / "m.bmp", 40)
    _image(tmp_path / "train" / "cat" / ".hidden.png", 50)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    _image(tmp_path / "val" / "dog" / "v.png", 60)
    return tmp_path


def test_classes_sorted_and_files_walked_in_order(folder: Path) -> None:
    dataset = ImageFolderClassification(folder, split="train")
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.num_classes == 2
    relative = [(path.relative_to(folder / "train").as_posix(), label) for path, label in dataset.samples]
    assert relative == [("cat/m.bmp", 0), ("cat/sub/z.jpg", 0), ("dog/a.PNG", 1), ("dog/b.png", 1)]
    assert dataset.targets == [0, 0, 1, 1]


def test_items_follow_the_contract(folder: Path) -> None:
    dataset = ImageFolderClassification(folder, split="train")
    image, target = dataset[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 5)
    assert (image == 20).all()
    assert target["label"].dtype == torch.int64 and target["label"].shape == ()
    assert target["label"].item() == 1
    assert target["image_id"] == 2
    with pytest.raises(IndexError, match="index 4 out of range"):
        dataset[4]


def test_empty_class_folder_warns_and_keeps_its_label(folder: Path) -> None:
    (folder / "train" / "bird").mkdir()
    with pytest.warns(UserWarning, match=r"1 of 3 class folder\(s\) hold no images .*\['bird'\]"):
        dataset = ImageFolderClassification(folder, split="train")
    assert dataset.class_names == ["bird", "cat", "dog"]
    assert dataset.targets == [1, 1, 2, 2]


def test_fixed_class_names_keep_labels_across_splits(folder: Path) -> None:
    train = ImageFolderClassification(folder, split="train")
    with pytest.warns(UserWarning, match=r"\['cat'\]"):
        val = ImageFolderClassification(folder, split="val", class_names=train.class_names)
    assert val.targets == [1]  # "dog" keeps label 1 although "cat" has no val folder
    with pytest.raises(ValueError, match=r"has class folders not in class_names: \['dog'\]"):
        ImageFolderClassification(folder, split="val", class_names=["cat"])


def test_no_classes_and_no_images_raise(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"no class folders in " + re.escape(str(tmp_path / "train"))):
        ImageFolderClassification(tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match=r"no images with extensions .* in the class folders of"):
        ImageFolderClassification(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "test"))):
        ImageFolderClassification(tmp_path, split="test")


def test_split_none_reads_class_folders_under_root(folder: Path) -> None:
    dataset = ImageFolderClassification(folder / "val", split=None)
    assert dataset.class_names == ["dog"]
    assert len(dataset) == 1


def test_extensions_filter(folder: Path) -> None:
    dataset = ImageFolderClassification(folder, split="train", extensions=["png", ".JPG"])
    assert [path.name for path, _ in dataset.samples] == ["z.jpg", "a.PNG", "b.png"]


def test_unreadable_image_names_the_file(folder: Path) -> None:
    broken = folder / "train" / "cat" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    dataset = ImageFolderClassification(folder, split="train")
    index = [path for path, _ in dataset.samples].index(broken)
    with pytest.raises(ImageReadError, match=re.escape(str(broken))):
        dataset[index]


def test_unlabeled_folder_walks_recursively_in_sorted_order(folder: Path) -> None:
    dataset = UnlabeledImageFolder(folder)
    names = [path.relative_to(folder).as_posix() for path in dataset.paths]
    assert names == ["train/cat/m.bmp", "train/cat/sub/z.jpg", "train/dog/a.PNG", "train/dog/b.png", "val/dog/v.png"]
    image, target = dataset[4]
    assert (image == 60).all()
    assert target == {"image_id": 4, "path": str(folder / "val" / "dog" / "v.png")}


def test_unlabeled_folder_follows_symlinked_folders(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "linked").symlink_to(folder / "val", target_is_directory=True)
    assert [p.name for p in UnlabeledImageFolder(corpus).paths] == ["v.png"]


def test_unlabeled_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        UnlabeledImageFolder(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images with extensions .* under " + re.escape(str(tmp_path))):
        UnlabeledImageFolder(tmp_path)


def test_transforms_are_applied(folder: Path) -> None:
    dataset = UnlabeledImageFolder(folder, transforms=lambda image, target: (image.float() / 255, {**target, "x": 1}))
    image, target = dataset[0]
    assert image.dtype == torch.float32
    assert target["x"] == 1


def test_reads_the_synthetic_demo_set(demo_paths: dict[str, dict[str, Path]]) -> None:
    paths = demo_paths["classification"]
    train = ImageFolderClassification(paths["root"], split="train")
    val = ImageFolderClassification(paths["root"], split="val", class_names=train.class_names)
    assert train.class_names == ["circle", "square", "triangle"]
    for dataset, split in ((train, "train"), (val, "val")):
        on_disk = [len(list((paths[split] / name).glob("*.png"))) for name in train.class_names]
        assert np.bincount(dataset.targets).tolist() == on_disk
        assert min(on_disk) > 0
    image, _ = val[0]
    assert image.shape == (3, 64, 64)
