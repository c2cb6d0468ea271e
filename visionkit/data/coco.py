"""COCO instances dataset: reads the official ``instances_*.json`` and image folder, validating both.

Behaviour worth knowing (all fixed at construction, in one pass over the JSON):

- **Validation.** One validator for training and evaluation (``visionkit.utils.coco_format.validate_instances``):
  missing top-level keys, wrong types, duplicate ids, annotations pointing at unknown images or categories,
  non-finite or negative boxes, malformed polygons (fewer than 6 coordinates, odd length, non-numbers, coordinates
  more than one image size outside the image) and malformed RLE (size differing from the image, run lengths not
  summing to ``height * width``, undecodable ``counts`` strings) raise :class:`COCOFormatError`, whose message names
  the file, the record (``annotations[12] (id 345)``) and the problem. Nothing malformed reaches pycocotools' C code.
  Training adds two rules: every image needs a ``file_name`` and, with ``with_masks``, every non-crowd annotation a
  ``segmentation``.
- **Labels.** Category ids (which may have gaps, e.g. COCO's 1..90) map to contiguous labels ``0..C-1`` in
  ascending id order: ``category_id_to_contiguous``, ``contiguous_to_category_id``, ``class_names``.
- **Crowd.** ``iscrowd=1`` annotations are left out of the training target (as in torchvision's and detectron2's
  Mask R-CNN recipes); evaluation sees them through the GT file (``ann_file`` / ``coco_gt``).
- **Degenerate boxes.** A non-crowd annotation whose box, clipped to the image, is at most ``min_box_size`` px wide
  or high, or whose ``area`` is 0, is dropped; one warning per dataset gives the count.
- **Empty images.** Images without (remaining) annotations are kept unless ``filter_empty=True``; an image whose
  only annotations are crowd or degenerate counts as empty.
- **Order.** Images are ordered by ascending image id; annotations keep their file order.
- **EXIF.** ``exif_orientation`` decides from the tag: ``"auto"`` (default) reads an image with an orientation tag
  as stored when the stored size equals the JSON's ``height``/``width`` (the frame COCO annotations are drawn in),
  else upright when that size matches, with one warning per dataset; ``"stored"`` / ``"upright"`` force a frame. A
  size that fits neither is a :class:`COCOFormatError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch.utils.data import Dataset

from visionkit.data.image_io import AnnotatedImageReader, AnnotationSizeError, ExifOrientationMode
from visionkit.utils.coco_format import COCOFormatError, COCOInstances, read_coco_json, validate_instances

__all__ = ["COCODataset", "COCOFormatError"]

Transforms = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]


def _decode_rles(rles: list[dict[str, Any]]) -> np.ndarray:
    """``pycocotools.mask.decode`` of a list of RLEs -> uint8 (H, W, N), Fortran order."""
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips NumPy 2's "__array__ ... copy keyword" DeprecationWarning; harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return mask_util.decode(rles)


class COCODataset(Dataset):
    """COCO-format instance detection / segmentation dataset (see the module docstring for the rules).

    Items are ``(image, target)``: ``image`` uint8 (3, H, W) RGB; ``target`` holds ``boxes`` float32 (N, 4) xyxy in
    absolute pixels, clipped to the image; ``labels`` int64 (N,) contiguous ``0..C-1``; ``masks`` bool (N, H, W)
    (only with ``with_masks``); ``image_id`` int (the COCO id); ``orig_size`` ``(H, W)`` ints of the image on disk.
    ``transforms(image, target) -> (image, target)`` is applied last.

    Args:
        root: Image directory (``file_name`` is relative to it), e.g. ``coco/train2017``.
        ann_file: Instances JSON, e.g. ``coco/annotations/instances_train2017.json``.
        transforms: Joint image/target transform.
        with_masks: Decode segmentations into ``masks``; every non-crowd annotation then needs a segmentation.
        filter_empty: Drop images without usable (non-crowd, non-degenerate) annotations.
        min_box_size: Boxes at most this wide or high (px, after clipping) are degenerate.
        verify_files: Check at construction that every image file exists (one ``stat`` per image).
        exif_orientation: Frame of images with an EXIF orientation tag (:mod:`visionkit.data.image_io`):
            ``"stored"`` always reads the stored pixels (the pycocotools / torchvision convention), ``"upright"``
            always applies the tag, ``"auto"`` reads a tagged image as stored when the stored size equals the JSON's
            ``height``/``width`` (COCO annotation tools work on the stored pixels; this covers square and 180°
            images), else upright when that size matches (one warning per dataset). A size that fits neither is a
            :class:`COCOFormatError` naming the file.

    Raises:
        FileNotFoundError: ``ann_file`` (or, with ``verify_files``, an image) does not exist.
        COCOFormatError: The JSON is malformed (message names the file, the id and the problem).
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        transforms: Transforms | None = None,
        with_masks: bool = True,
        filter_empty: bool = False,
        min_box_size: float = 1.0,
        verify_files: bool = False,
        exif_orientation: ExifOrientationMode = "auto",
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self._image_reader = AnnotatedImageReader(exif_orientation, owner=f"COCODataset({self.ann_file})")
        self.transforms = transforms
        self.with_masks = with_masks
        self.filter_empty = filter_empty
        self.min_box_size = float(min_box_size)
        self._coco = read_coco_json(self.ann_file, "COCO annotation")
        instances = validate_instances(
            self._coco,
            str(self.ann_file),
            require_file_name=True,
            require_category_name=True,
            require_segmentation="non_crowd" if with_masks else "none",
        )
        ordered_ids = sorted(instances.category_names)
        self.category_id_to_contiguous: dict[int, int] = {cid: label for label, cid in enumerate(ordered_ids)}
        self.contiguous_to_category_id: dict[int, int] = dict(enumerate(ordered_ids))
        self.class_names: list[str] = [instances.category_names[cid] for cid in ordered_ids]
        self._index_annotations(instances)
        if verify_files:
            missing = [str(self.root / image["file_name"]) for image in self._images]
            missing = [path for path in missing if not Path(path).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) listed in {self.ann_file} are missing, e.g. {missing[:3]}"
                )

    # ------------------------------------------------------------------------------------------------ loading
    def _index_annotations(self, instances: COCOInstances) -> None:
        """Build per-image arrays of the training (non-crowd, non-degenerate) annotations of a validated file."""
        images_by_id = {int(image["id"]): image for image in instances.images}
        annotations = [a for a in instances.annotations if not a.get("iscrowd", 0)]
        sizes = np.array(
            [(images_by_id[a["image_id"]]["width"], images_by_id[a["image_id"]]["height"]) for a in annotations],
            dtype=np.float64,
        ).reshape(-1, 2)
        xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        x1 = np.clip(xywh[:, 0], 0.0, sizes[:, 0])
        y1 = np.clip(xywh[:, 1], 0.0, sizes[:, 1])
        x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0.0, sizes[:, 0])
        y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0.0, sizes[:, 1])
        zero_area = np.array([a.get("area", 1) <= 0 for a in annotations], dtype=bool)
        degenerate = (x2 - x1 <= self.min_box_size) | (y2 - y1 <= self.min_box_size) | zero_area
        if degenerate.any():
            warnings.warn(
                f"{self.ann_file}: dropped {int(degenerate.sum())} of {len(annotations)} non-crowd annotations with "
                f"degenerate boxes (width or height <= {self.min_box_size:g} px after clipping to the image, or "
                f"area 0), e.g. annotation ids {[annotations[i]['id'] for i in np.flatnonzero(degenerate)[:5]]}",
                stacklevel=3,
            )
        keep = np.flatnonzero(~degenerate)

        image_ids = sorted(images_by_id)
        image_index = {image_id: index for index, image_id in enumerate(image_ids)}
        owner = np.array([image_index[int(annotations[i]["image_id"])] for i in keep], dtype=np.int64)
        order = keep[np.argsort(owner, kind="stable")]
        counts = np.bincount(owner, minlength=len(image_ids))
        if self.filter_empty:
            image_ids = [image_id for image_id, count in zip(image_ids, counts, strict=True) if count > 0]
            counts = counts[counts > 0]
        self._images: list[dict[str, Any]] = [images_by_id[image_id] for image_id in image_ids]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._boxes = np.stack([x1, y1, x2, y2], axis=1)[order].astype(np.float32).reshape(-1, 4)
        self._labels = np.array(
            [self.category_id_to_contiguous[int(annotations[i]["category_id"])] for i in order], dtype=np.int64
        )
        self._segmentations = [annotations[i].get("segmentation") for i in order]

    # ------------------------------------------------------------------------------------------------ access
    @property
    def coco_gt(self) -> dict[str, Any]:
        """The loaded annotation file, unmodified (crowd and degenerate annotations included), for evaluators."""
        return self._coco

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids of the items, in item order."""
        return [image["id"] for image in self._images]

    @property
    def num_classes(self) -> int:
        """Number of categories C (labels are ``0..C-1``)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._images)

    def get_image_info(self, index: int) -> dict[str, Any]:
        """A copy of the ``images`` record of item ``index`` (``id``, ``file_name``, ``height``, ``width``, ...)."""
        return dict(self._images[index])

    def _read_image(self, image: dict[str, Any]) -> torch.Tensor:
        """The pixels of an ``images`` record in the frame of its annotations (``exif_orientation`` policy)."""
        expected = (image["height"], image["width"])
        try:
            return self._image_reader(
                self.root / image["file_name"], expected, f"image id {image['id']} in {self.ann_file}"
            )
        except AnnotationSizeError as error:
            raise COCOFormatError(str(error)) from error

    def _decode_masks(self, start: int, end: int, height: int, width: int) -> torch.Tensor:
        if start == end:
            return torch.zeros((0, height, width), dtype=torch.bool)
        rles = []
        for segmentation in self._segmentations[start:end]:
            if isinstance(segmentation, list):  # polygons of one object -> one RLE
                rles.append(mask_util.merge(mask_util.frPyObjects(segmentation, height, width)))
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                rles.append(mask_util.frPyObjects(segmentation, height, width))
            else:  # compressed RLE, already validated
                rles.append({"size": [height, width], "counts": segmentation["counts"]})
        masks = _decode_rles(rles)  # uint8 (H, W, N), Fortran order
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=bool))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index``: ``(image uint8 (3, H, W), target)`` as described in the class docstring."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        image_record = self._images[index]
        image = self._read_image(image_record)
        height, width = image_record["height"], image_record["width"]
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(self._boxes[start:end].copy()),
            "labels": torch.from_numpy(self._labels[start:end].copy()),
            "image_id": int(image_record["id"]),
            "orig_size": (int(height), int(width)),
        }
        if self.with_masks:
            target["masks"] = self._decode_masks(start, end, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, ann_file={str(self.ann_file)!r}, images={len(self)}, "
            f"annotations={len(self._labels)}, classes={self.num_classes})"
        )
