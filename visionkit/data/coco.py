"""COCO instances dataset: reads the official ``instances_*.json`` and image folder, validating both.

Behaviour worth knowing (all fixed at construction, in one pass over the JSON):

- **Validation.** Missing top-level keys, wrong types, duplicate ids, annotations pointing at unknown images or
  categories, non-finite or negative boxes, malformed polygons (fewer than 6 coordinates, odd length, non-numbers,
  coordinates more than one image size outside the image) and malformed RLE (size differing from the image, run
  lengths not summing to ``height * width``, undecodable ``counts`` strings) raise :class:`COCOFormatError`, whose
  message names the file, the annotation / image id and the problem. Nothing malformed reaches pycocotools' C code.
- **Labels.** Category ids (which may have gaps, e.g. COCO's 1..90) map to contiguous labels ``0..C-1`` in
  ascending id order: ``category_id_to_contiguous``, ``contiguous_to_category_id``, ``class_names``.
- **Crowd.** ``iscrowd=1`` annotations are left out of the training target (as in torchvision's and detectron2's
  Mask R-CNN recipes); evaluation sees them through the GT file (``ann_file`` / ``coco_gt``).
- **Degenerate boxes.** A non-crowd annotation whose box, clipped to the image, is at most ``min_box_size`` px wide
  or high, or whose ``area`` is 0, is dropped; one warning per dataset gives the count.
- **Empty images.** Images without (remaining) annotations are kept unless ``filter_empty=True``; an image whose
  only annotations are crowd or degenerate counts as empty.
- **Order.** Images are ordered by ascending image id; annotations keep their file order.
- **EXIF.** Images are read upright (EXIF orientation applied). If that size differs from the JSON's
  ``height``/``width`` but the raw stored pixels match them, the annotations were made on the raw pixels, so those
  are used (with a warning); if neither matches, :class:`COCOFormatError` names the file.
"""

from __future__ import annotations

import errno
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch.utils.data import Dataset

from visionkit.data.image_io import read_image

__all__ = ["COCODataset", "COCOFormatError"]

Transforms = Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
_REQUIRED_KEYS = ("images", "annotations", "categories")


class COCOFormatError(ValueError):
    """A COCO annotation file (or an image it describes) does not follow the COCO instances format."""


def _is_int(value: Any) -> bool:
    return type(value) is int  # excludes bool, which is an int subclass


def _is_real(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compressed_rle_counts(counts: str) -> list[int] | None:
    """Decode a COCO compressed-RLE string into run lengths; None if it is not a valid encoding.

    The format (pycocotools ``rleToString``): each run length is written in 5-bit groups, low bits first, as
    characters ``48 + group`` with bit 0x20 meaning "more groups follow" and bit 0x10 of the last group the sign;
    from the third run on, the value stored is the difference to the run two places before.
    """
    if not counts.isascii():
        return None
    values: list[int] = []
    data = counts.encode("ascii")
    position, length = 0, len(data)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                return None
            group = data[position] - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def _decode_rles(rles: list[dict[str, Any]]) -> np.ndarray:
    """``pycocotools.mask.decode`` of a list of RLEs -> uint8 (H, W, N), Fortran order."""
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips NumPy 2's "__array__ ... copy keyword" DeprecationWarning; harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return mask_util.decode(rles)


def _segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Describe what is wrong with one annotation's ``segmentation``; None if it is well formed."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "'segmentation' is an empty polygon list"
        limit = max(height, width)
        for index, polygon in enumerate(segmentation):
            if not isinstance(polygon, list):
                return f"polygon {index} must be a list of numbers, got {_short(polygon)}"
            if len(polygon) < 6 or len(polygon) % 2:
                return f"polygon {index} has {len(polygon)} coordinates; a polygon needs an even number >= 6"
            try:
                finite = all(map(math.isfinite, polygon))
                inside = finite and min(polygon) >= -limit and max(polygon) <= 2 * limit
            except (TypeError, OverflowError):
                return f"polygon {index} holds a non-number: {_short(polygon)}"
            if not finite:
                return f"polygon {index} holds a non-finite coordinate: {_short(polygon)}"
            if not inside:
                return f"polygon {index} has coordinates more than one image size ({limit} px) outside the image"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size is None or counts is None:
            return f"RLE 'segmentation' needs 'size' and 'counts', got keys {sorted(segmentation)}"
        if not (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size))):
            return f"RLE 'size' must be [height, width] integers, got {_short(size)}"
        if size != [height, width]:
            return f"RLE 'size' {size} differs from the image's [height, width] [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(run) and run >= 0 for run in counts):
                return "uncompressed RLE 'counts' must be non-negative integers"
            runs: list[int] | None = counts
        elif isinstance(counts, str):
            runs = _compressed_rle_counts(counts)
            if runs is None or any(run < 0 for run in runs):
                return f"compressed RLE 'counts' is not a valid RLE string: {_short(counts)}"
        else:
            return f"RLE 'counts' must be a list (uncompressed) or a string (compressed), got {type(counts).__name__}"
        if sum(runs) != height * width:
            return f"RLE run lengths sum to {sum(runs)}, expected height * width = {height * width}"
        return None
    return f"'segmentation' must be a polygon list or an RLE dict, got {type(segmentation).__name__}"


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
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        self.filter_empty = filter_empty
        self.min_box_size = float(min_box_size)
        self._coco = self._load_json()
        images_by_id = self._validate_images()
        self._validate_categories()
        self._index_annotations(images_by_id)
        if verify_files:
            missing = [str(self.root / image["file_name"]) for image in self._images]
            missing = [path for path in missing if not Path(path).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) listed in {self.ann_file} are missing, e.g. {missing[:3]}"
                )

    # ------------------------------------------------------------------------------------------------ loading
    def _fail(self, where: str, problem: str) -> COCOFormatError:
        return COCOFormatError(f"{self.ann_file}: {where}: {problem}")

    def _load_json(self) -> dict[str, Any]:
        if not self.ann_file.is_file():
            raise FileNotFoundError(errno.ENOENT, "COCO annotation file not found", str(self.ann_file))
        try:
            content = json.loads(self.ann_file.read_bytes())
        except (ValueError, RecursionError) as error:
            raise COCOFormatError(f"{self.ann_file}: not valid JSON ({error})") from error
        if not isinstance(content, dict):
            raise self._fail("top level", f"must be a JSON object, got {type(content).__name__}")
        for key in _REQUIRED_KEYS:
            if key not in content:
                raise self._fail("top level", f"missing key {key!r} (an instances file needs {list(_REQUIRED_KEYS)})")
            if not isinstance(content[key], list):
                raise self._fail("top level", f"{key!r} must be a list, got {type(content[key]).__name__}")
        return content

    def _validate_images(self) -> dict[int, dict[str, Any]]:
        images_by_id: dict[int, dict[str, Any]] = {}
        for position, image in enumerate(self._coco["images"]):
            if not isinstance(image, dict):
                raise self._fail(f"images[{position}]", f"must be an object, got {_short(image)}")
            image_id = image.get("id")
            if not _is_int(image_id):
                raise self._fail(f"images[{position}]", f"'id' must be an integer, got {_short(image_id)}")
            where = f"image id {image_id}"
            if image_id in images_by_id:
                raise self._fail(where, "duplicate image id")
            file_name = image.get("file_name")
            if not isinstance(file_name, str) or not file_name or "\0" in file_name:
                raise self._fail(where, f"'file_name' must be a non-empty string, got {_short(file_name)}")
            for key in ("height", "width"):
                if not _is_int(image.get(key)) or not 0 < image[key] < 2**31:
                    raise self._fail(where, f"{key!r} must be a positive integer, got {_short(image.get(key))}")
            images_by_id[image_id] = image
        return images_by_id

    def _validate_categories(self) -> None:
        names: dict[int, str] = {}
        for position, category in enumerate(self._coco["categories"]):
            if not isinstance(category, dict):
                raise self._fail(f"categories[{position}]", f"must be an object, got {_short(category)}")
            category_id = category.get("id")
            if not _is_int(category_id):
                raise self._fail(f"categories[{position}]", f"'id' must be an integer, got {_short(category_id)}")
            if category_id in names:
                raise self._fail(f"category id {category_id}", "duplicate category id")
            if not isinstance(category.get("name"), str):
                raise self._fail(f"category id {category_id}", f"'name' must be a string, got {category.get('name')!r}")
            names[category_id] = category["name"]
        if not names:
            raise self._fail("top level", "'categories' is empty")
        ordered_ids = sorted(names)
        self.category_id_to_contiguous: dict[int, int] = {cid: label for label, cid in enumerate(ordered_ids)}
        self.contiguous_to_category_id: dict[int, int] = dict(enumerate(ordered_ids))
        self.class_names: list[str] = [names[cid] for cid in ordered_ids]

    def _validate_annotation(self, position: int, annotation: Any, images_by_id: dict[int, dict[str, Any]]) -> None:
        if not isinstance(annotation, dict):
            raise self._fail(f"annotations[{position}]", f"must be an object, got {_short(annotation)}")
        annotation_id = annotation.get("id")
        if not _is_int(annotation_id):
            raise self._fail(f"annotations[{position}]", f"'id' must be an integer, got {_short(annotation_id)}")
        where = f"annotation id {annotation_id}"
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        if not _is_int(image_id) or image_id not in images_by_id:
            raise self._fail(where, f"'image_id' {_short(image_id)} is not an image id listed in 'images'")
        if not _is_int(category_id) or category_id not in self.category_id_to_contiguous:
            raise self._fail(where, f"'category_id' {_short(category_id)} is not a category id listed in 'categories'")
        iscrowd = annotation.get("iscrowd", 0)
        if type(iscrowd) not in (int, bool) or iscrowd not in (0, 1):
            raise self._fail(where, f"'iscrowd' must be 0 or 1, got {_short(iscrowd)}")
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_real, bbox))):
            raise self._fail(where, f"'bbox' must be [x, y, width, height] of finite numbers, got {_short(bbox)}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise self._fail(where, f"'bbox' has a negative width or height: {bbox}")
        if "area" in annotation and not (_is_real(annotation["area"]) and annotation["area"] >= 0):
            raise self._fail(where, f"'area' must be a finite number >= 0, got {_short(annotation['area'])}")
        image = images_by_id[image_id]
        if "segmentation" in annotation:
            problem = _segmentation_problem(annotation["segmentation"], image["height"], image["width"])
            if problem is not None:
                raise self._fail(f"{where} (image id {image_id})", problem)
        elif self.with_masks and not annotation.get("iscrowd", 0):
            raise self._fail(where, "no 'segmentation' (needed with with_masks=True)")

    def _index_annotations(self, images_by_id: dict[int, dict[str, Any]]) -> None:
        """Validate annotations and build per-image arrays of the training annotations, in one pass."""
        seen_ids: set[int] = set()
        kept_positions: list[int] = []
        for position, annotation in enumerate(self._coco["annotations"]):
            self._validate_annotation(position, annotation, images_by_id)
            if annotation["id"] in seen_ids:
                raise self._fail(f"annotation id {annotation['id']}", "duplicate annotation id")
            seen_ids.add(annotation["id"])
            if not annotation.get("iscrowd", 0):
                kept_positions.append(position)

        annotations = [self._coco["annotations"][p] for p in kept_positions]
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
        owner = np.array([image_index[annotations[i]["image_id"]] for i in keep], dtype=np.int64)
        order = keep[np.argsort(owner, kind="stable")]
        counts = np.bincount(owner, minlength=len(image_ids))
        if self.filter_empty:
            image_ids = [image_id for image_id, count in zip(image_ids, counts, strict=True) if count > 0]
            counts = counts[counts > 0]
        self._images: list[dict[str, Any]] = [images_by_id[image_id] for image_id in image_ids]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._boxes = np.stack([x1, y1, x2, y2], axis=1)[order].astype(np.float32).reshape(-1, 4)
        self._labels = np.array(
            [self.category_id_to_contiguous[annotations[i]["category_id"]] for i in order], dtype=np.int64
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
        path = self.root / image["file_name"]
        expected = (image["height"], image["width"])
        pixels = read_image(path)
        if tuple(pixels.shape[1:]) == expected:
            return pixels
        raw = read_image(path, apply_exif_orientation=False)
        if tuple(raw.shape[1:]) == expected:
            warnings.warn(
                f"{path}: the EXIF orientation changes the size to {tuple(pixels.shape[1:])} but {self.ann_file} "
                f"gives {expected}; using the raw stored pixels, which match the annotations",
                stacklevel=3,
            )
            return raw
        raise COCOFormatError(
            f"{path}: decoded image size (H, W) = {tuple(pixels.shape[1:])} differs from height/width {expected} "
            f"given for image id {image['id']} in {self.ann_file}"
        )

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
