"""Image-folder datasets: labelled class trees, unlabelled corpora and multi-dataset pretraining collections.

Layouts: ``root/<split>/<class>/<image>`` (:class:`ImageFolderClassification`), any tree of images or
``root/<dataset>/<image_subdir>/**`` (:class:`UnlabeledImageFolder`).

Folders and files are walked recursively (following symbolic links) and sorted, so the item order is the same on
every machine; names starting with ``.`` are skipped, as are files whose suffix is not in ``extensions``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visionkit.data.image_io import IMAGE_EXTENSIONS, read_image

__all__ = ["ImageFolderClassification", "NumberedImageFolder", "UnlabeledImageFolder"]

Transforms = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    normalised = tuple(ext.lower() if ext.startswith(".") else "." + ext.lower() for ext in extensions)
    if not normalised:
        raise ValueError("extensions must not be empty")
    return normalised


def _walk_images(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Every image file under ``directory`` (recursive, links followed, hidden names skipped), sorted."""
    found = []
    for current, subdirs, files in os.walk(directory, followlinks=True):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found += [
            Path(current) / name
            for name in files
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions
        ]
    return sorted(found)


class ImageFolderClassification(Dataset):
    """Classification images stored as ``root/<split>/<class name>/**/<image>``.

    Classes are the sub-folders of ``root/<split>`` in sorted order (label = position), unless ``class_names`` fixes
    them — pass the train set's ``class_names`` to the val set so that a class missing from one split cannot shift
    the labels of the others. A class folder without images is kept (its label stays reserved) and reported by one
    warning. Image files directly inside ``root/<split>`` belong to no class and are ignored.

    Items are ``(image uint8 (3, H, W), {"label": int64 scalar tensor, "image_id": int index})``;
    ``transforms(image, target) -> (image, target)`` is applied last.

    Args:
        root: Dataset folder holding the split folders.
        split: Split folder name (e.g. ``"train"``, ``"val"``); None reads class folders directly under ``root``.
        transforms: Joint image/target transform.
        extensions: File suffixes treated as images (case-insensitive).
        class_names: Fixed class list (folder names); folders not listed raise, listed classes without a folder
            are treated as empty.

    Raises:
        FileNotFoundError: The split folder does not exist.
        ValueError: No class folders, no images at all, or a folder that is not in ``class_names``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        transforms: Transforms | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.extensions = _normalise_extensions(extensions)
        self.split_dir = self.root / split if split is not None else self.root
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.split_dir}")
        folders = sorted(p.name for p in self.split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_names is None:
            if not folders:
                raise ValueError(f"no class folders in {self.split_dir} (expected <class>/<image> sub-folders)")
            class_names = folders
        else:
            unknown = sorted(set(folders) - set(class_names))
            if unknown:
                raise ValueError(f"{self.split_dir} has class folders not in class_names: {unknown}")
        self.class_names: list[str] = list(class_names)
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, name in enumerate(self.class_names):
            files = _walk_images(self.split_dir / name, self.extensions) if (self.split_dir / name).is_dir() else []
            if not files:
                empty.append(name)
            self.samples += [(path, label) for path in files]
        if not self.samples:
            raise ValueError(
                f"no images with extensions {list(self.extensions)} in the class folders of {self.split_dir}"
            )
        if empty:
            warnings.warn(
                f"{self.split_dir}: {len(empty)} of {len(self.class_names)} class folder(s) hold no images with "
                f"extensions {list(self.extensions)}: {empty}",
                stacklevel=2,
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0..num_classes-1``)."""
        return len(self.class_names)

    @property
    def targets(self) -> list[int]:
        """The label of every item, in item order."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``: ``(image uint8 (3, H, W), {"label", "image_id"})``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        path, label = self.samples[index]
        image = read_image(path)
        target: dict[str, Any] = {"label": torch.tensor(label, dtype=torch.int64), "image_id": index}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.split_dir)!r}, images={len(self)}, classes={self.num_classes})"


class UnlabeledImageFolder(Dataset):
    """Every image under ``root`` (recursive, sorted), for pretraining corpora without labels.

    Two layouts:

    - ``image_subdir=None``: every image below ``root``. Items are
      ``(image uint8 (3, H, W), {"image_id": int index, "path": str})``.
    - ``image_subdir="images"`` (the OpenUS collection): ``root`` holds one folder per source dataset and only
      ``root/<dataset>/images/**`` is read, so siblings such as ``masks/`` or ``labels/`` never leak into the corpus.
      Files directly in ``root`` and hidden folders are ignored. Items add ``"dataset": <folder name>`` to the target;
      :attr:`dataset_sizes` gives the images per dataset. A dataset folder without that sub-folder, or whose
      sub-folder holds no image, is an error naming every such folder (a half-downloaded dataset should not silently
      shrink the corpus); ``skip_incomplete=True`` drops them with one warning instead.

    ``transforms(image, target) -> (image, target)`` is applied last. Images are decoded by
    :func:`~visionkit.data.image_io.read_image` (greyscale and 16-bit files become 8-bit RGB).

    Args:
        root: Folder to walk (the collection root when ``image_subdir`` is set).
        transforms: Joint image/target transform.
        extensions: File suffixes treated as images (case-insensitive).
        image_subdir: Name of the image folder inside each dataset folder; ``None`` walks all of ``root``.
        skip_incomplete: With ``image_subdir``, skip (with a warning) dataset folders without images instead of
            raising.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: No images under ``root``; with ``image_subdir``, no dataset folder, or (unless
            ``skip_incomplete``) dataset folders without ``image_subdir`` or without images in it.
    """

    def __init__(
        self,
        root: str | Path,
        transforms: Transforms | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        image_subdir: str | None = None,
        skip_incomplete: bool = False,
    ) -> None:
        self.root = Path(root)
        self.transforms = transforms
        self.extensions = _normalise_extensions(extensions)
        self.image_subdir = image_subdir
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        #: Dataset folder names in sorted order (empty without ``image_subdir``).
        self.dataset_names: list[str] = []
        # Per item, the position of its dataset in `dataset_names` (one array, not 300K Python ints).
        self._dataset_of = np.zeros(0, dtype=np.int32)
        if image_subdir is None:
            self.paths: list[Path] = _walk_images(self.root, self.extensions)
            if not self.paths:
                raise ValueError(f"no images with extensions {list(self.extensions)} under {self.root}")
        else:
            self.paths = self._walk_datasets(image_subdir, skip_incomplete)

    def _walk_datasets(self, image_subdir: str, skip_incomplete: bool) -> list[Path]:
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(
                f"no dataset folders in {self.root} (expected <dataset>/{image_subdir}/<images> sub-folders)"
            )
        paths: list[Path] = []
        counts: list[int] = []
        missing, empty = [], []
        for name in folders:
            directory = self.root / name / image_subdir
            files = _walk_images(directory, self.extensions) if directory.is_dir() else []
            if not directory.is_dir():
                missing.append(name)
            elif not files:
                empty.append(name)
            else:
                self.dataset_names.append(name)
                counts.append(len(files))
                paths += files
        if missing or empty:
            parts = [f"{len(missing)} without a {image_subdir!r} folder: {missing}"] if missing else []
            if empty:
                parts.append(f"{len(empty)} with no {list(self.extensions)} file in it: {empty}")
            message = f"{self.root}: {len(missing) + len(empty)} of {len(folders)} dataset folders give no images, "
            message += "; ".join(parts)
            if not skip_incomplete:
                raise ValueError(f"{message}. Fix or move them, or pass skip_incomplete=True to skip them.")
            if not paths:
                raise ValueError(f"{message}; no images left")
            warnings.warn(f"{message}; skipped (skip_incomplete=True)", stacklevel=3)
        self._dataset_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        return paths

    @property
    def dataset_sizes(self) -> dict[str, int]:
        """Images per dataset folder, in sorted folder order (empty without ``image_subdir``)."""
        counts = np.bincount(self._dataset_of, minlength=len(self.dataset_names))
        return {name: int(count) for name, count in zip(self.dataset_names, counts, strict=True)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``: ``(image uint8 (3, H, W), {"image_id", "path"[, "dataset"]})``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        path = self.paths[index]
        image = read_image(path)
        target: dict[str, Any] = {"image_id": index, "path": str(path)}
        if self.image_subdir is not None:
            target["dataset"] = self.dataset_names[int(self._dataset_of[index])]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        if self.image_subdir is None:
            return f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)})"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, image_subdir={self.image_subdir!r}, images={len(self)}, "
            f"datasets={len(self.dataset_names)})"
        )


class NumberedImageFolder(UnlabeledImageFolder):
    """:class:`UnlabeledImageFolder` with COCO-style ids ``1..N`` and the image's ``orig_size`` in the target.

    Items are ``(image uint8 (3, H, W), {"image_id": index + 1, "path": str, "orig_size": (H, W)})``.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``: the image as stored and its target."""
        image, target = super().__getitem__(index)
        target = {**target, "image_id": int(target["image_id"]) + 1}
        target.setdefault("orig_size", (int(image.shape[-2]), int(image.shape[-1])))
        return image, target
