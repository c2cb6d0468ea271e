"""ADE20K (SceneParsing ``ADEChallengeData2016``) semantic segmentation dataset.

Layout: ``<root>/images/{training,validation}/ADE_*.jpg`` and ``<root>/annotations/{training,validation}/ADE_*.png``,
paired by file stem; 20,210 training and 2,000 validation images, 150 classes. Annotation PNGs hold 0 for
"other/background" (not one of the 150 classes) and 1..150 for the classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from visionkit.data.image_io import IMAGE_EXTENSIONS, AnnotatedImageReader, ExifOrientationMode, read_label_map
from visionkit.utils.constants import IGNORE_INDEX

__all__ = ["ADE20K_CLASSES", "ADE20KDataset"]

Transforms = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]

# The 150 SceneParsing classes in label order 1..150 (objectInfo150; same order as mmsegmentation's
# ADE20KDataset, whose "bed " carries a stray trailing space that is dropped here).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}


class ADE20KDataset(Dataset):
    """ADE20K semantic segmentation, read from the official ``ADEChallengeData2016`` folder.

    Items are ``(image, target)``: ``image`` uint8 (3, H, W) RGB; ``target`` holds ``mask`` int64 (H, W),
    ``image_id`` (the item index, an ``int``; the file stem is in :meth:`get_image_info`) and ``orig_size`` ``(H, W)``.
    ``transforms(image, target) -> (image, target)`` is applied last.

    With ``reduce_zero_label=True`` (the mmsegmentation convention for ADE20K) stored 0 becomes 255 (ignored) and
    k becomes k - 1, so labels are 0..149 and ``class_names`` is :data:`ADE20K_CLASSES`. With False the stored
    values are kept: 0..150 with ``class_names[0] == "other"``. A stored value above 150 raises ``ValueError``
    naming the file when the item is loaded.

    The label map is read as stored. The image's EXIF orientation tag is handled by ``exif_orientation``
    (:mod:`visionkit.data.image_io`): ADE20K's label maps were drawn on the stored pixels, so ``"auto"`` reads a
    tagged image as stored when its stored size equals the label map's (square and 180° images included), else
    upright when that size matches, with one warning per dataset. A size that fits neither raises ``ValueError``
    naming both files.

    Args:
        root: The ``ADEChallengeData2016`` folder.
        split: ``"training"`` / ``"train"`` or ``"validation"`` / ``"val"``.
        transforms: Joint image/target transform.
        reduce_zero_label: Map 0 → 255 and k → k - 1.
        exif_orientation: ``"auto"``, ``"stored"`` (always the stored pixels) or ``"upright"`` (always the tag
            applied) for images with an EXIF orientation tag.

    Raises:
        ValueError: An unknown split or ``exif_orientation``.
        FileNotFoundError: A missing folder, no images, or an image without its annotation (or the reverse);
            the message names the file.
    """

    num_stored_classes = len(ADE20K_CLASSES)

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Transforms | None = None,
        reduce_zero_label: bool = True,
        exif_orientation: ExifOrientationMode = "auto",
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown ADE20K split {split!r}; expected one of {sorted(_SPLITS)}")
        self.root = Path(root)
        self.split = _SPLITS[split]
        self.exif_orientation = exif_orientation
        self._image_reader = AnnotatedImageReader(exif_orientation, owner=f"ADE20KDataset({self.root}, {self.split})")
        self.transforms = transforms
        self.reduce_zero_label = reduce_zero_label
        self.class_names: list[str] = list(ADE20K_CLASSES) if reduce_zero_label else ["other", *ADE20K_CLASSES]
        self.image_dir = self.root / "images" / self.split
        self.annotation_dir = self.root / "annotations" / self.split
        for directory in (self.image_dir, self.annotation_dir):
            if not directory.is_dir():
                nested = self.root / "ADEChallengeData2016"
                hint = f"; root should be the ADEChallengeData2016 folder itself: {nested}" if nested.is_dir() else ""
                raise FileNotFoundError(f"ADE20K folder not found: {directory}{hint}")
        self._pairs = self._pair_files()

    def _pair_files(self) -> list[tuple[Path, Path]]:
        images = {p.stem: p for p in self.image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
        labels = {p.stem: p for p in self.annotation_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        if not images:
            raise FileNotFoundError(f"no images in {self.image_dir}")
        without_label = sorted(set(images) - set(labels))
        if without_label:
            first = images[without_label[0]]
            raise FileNotFoundError(
                f"{len(without_label)} ADE20K image(s) have no annotation, e.g. {first} has no "
                f"{self.annotation_dir / (first.stem + '.png')}"
            )
        without_image = sorted(set(labels) - set(images))
        if without_image:
            raise FileNotFoundError(
                f"{len(without_image)} ADE20K annotation(s) have no image, e.g. {labels[without_image[0]]} has no "
                f"image named {without_image[0]}.jpg in {self.image_dir}"
            )
        return [(images[stem], labels[stem]) for stem in sorted(images)]

    @property
    def num_classes(self) -> int:
        """Number of classes in the targets: 150 with ``reduce_zero_label``, else 151."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._pairs)

    def get_image_info(self, index: int) -> dict[str, Any]:
        """``image_id`` (the index), ``stem``, ``image_path`` and ``annotation_path`` of item ``index``."""
        image_path, annotation_path = self._pairs[index]
        return {
            "image_id": index,
            "stem": image_path.stem,
            "image_path": image_path,
            "annotation_path": annotation_path,
        }

    def _load(self, image_path: Path, annotation_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        label_map = read_label_map(annotation_path)
        size = (int(label_map.shape[0]), int(label_map.shape[1]))
        image = self._image_reader(image_path, size, f"its label map {annotation_path}")
        return image, label_map

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``: ``(image uint8 (3, H, W), {"mask", "image_id", "orig_size"})``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        image_path, annotation_path = self._pairs[index]
        image, label_map = self._load(image_path, annotation_path)
        if label_map.numel() and int(label_map.max()) > self.num_stored_classes:
            raise ValueError(
                f"label map {annotation_path} holds value {int(label_map.max())}; ADE20K labels are 0..150 "
                "(0 = other), so this is not an ADE20K index map"
            )
        if self.reduce_zero_label:
            label_map = torch.where(label_map == 0, IGNORE_INDEX, label_map - 1)
        target: dict[str, Any] = {
            "mask": label_map,
            "image_id": index,
            "orig_size": (int(label_map.shape[0]), int(label_map.shape[1])),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"
