"""Validation of a COCO instances file (``images``, ``annotations``, ``categories``), for datasets and evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from visionkit.utils.coco_format.common import COCOFormatError, is_int, is_real, short_repr
from visionkit.utils.coco_format.rle import (
    check_compressed_rles,
    rle_problem,
    rle_size_problem,
    rle_string_problem_text,
)

__all__ = ["COCOInstances", "validate_instances"]

_MAX_IMAGE_SIDE = 2**31
_REQUIRED_KEYS = ("images", "annotations", "categories")
# Types accepted as coordinates (bool, a subclass of int, is not one of them).
_NUMBER_TYPES = frozenset({int, float, np.float64, np.float32, np.int64, np.int32})


@dataclass(frozen=True)
class COCOInstances:
    """A validated COCO instances file (the caller's records, not copied).

    Attributes:
        images: The ``images`` records in file order.
        image_sizes: Image id → ``(height, width)`` in pixels, in file order.
        category_names: Category id → name (``str(id)`` where a record has no ``name`` and names are optional).
        annotations: The ``annotations`` records in file order.
        missing_segmentation: Positions in ``annotations`` of the records without ``segmentation``.
        content: The whole parsed file.
    """

    images: list[dict[str, Any]]
    image_sizes: dict[int, tuple[int, int]]
    category_names: dict[int, str]
    annotations: list[dict[str, Any]]
    missing_segmentation: list[int]
    content: dict[str, Any]


def _polygon_problem(segmentation: list[Any], height: int, width: int) -> str | None:
    if not segmentation:
        return "'segmentation' is an empty polygon list"
    limit = max(height, width)
    for index, polygon in enumerate(segmentation):
        if not isinstance(polygon, list):
            return f"polygon {index} must be a list of numbers, got {short_repr(polygon)}"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"polygon {index} has {len(polygon)} coordinates; a polygon needs an even number >= 6"
        if not set(map(type, polygon)) <= _NUMBER_TYPES:  # C-level loops: polygons are most of a GT file
            return f"polygon {index} holds a non-number: {short_repr(polygon)}"
        try:
            finite = math.isfinite(sum(polygon))  # nan / inf anywhere makes the sum nan / inf
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            return f"polygon {index} holds a non-finite coordinate: {short_repr(polygon)}"
        if min(polygon) < -limit or max(polygon) > 2 * limit:
            return f"polygon {index} has coordinates more than one image size ({limit} px) outside the image"
    return None


class _InstancesValidator:
    """One pass over an instances file; errors are ``COCOFormatError("<source>: <where>: <problem>")``."""

    def __init__(self, source: str, require_file_name: bool, require_category_name: bool, require_area: bool) -> None:
        self.source = source
        self.require_file_name = require_file_name
        self.require_category_name = require_category_name
        self.require_area = require_area

    def fail(self, where: str, problem: str) -> COCOFormatError:
        return COCOFormatError(f"{self.source}: {where}: {problem}")

    def top_level(self, content: Any) -> dict[str, Any]:
        if not isinstance(content, Mapping):
            raise self.fail("top level", f"must be a JSON object, got {type(content).__name__}")
        for key in _REQUIRED_KEYS:
            if key not in content:
                raise self.fail("top level", f"missing key {key!r} (an instances file needs {list(_REQUIRED_KEYS)})")
            if not isinstance(content[key], list):
                raise self.fail("top level", f"{key!r} must be a list, got {type(content[key]).__name__}")
        return dict(content)

    def _entry_id(self, section: str, position: int, entry: Any, first_position: dict[int, int]) -> tuple[int, str]:
        """The integer ``id`` of ``section[position]`` (an object, unique so far) and where to point an error at it."""
        where = f"{section}[{position}]"
        if not isinstance(entry, Mapping):
            raise self.fail(where, f"must be an object, got {short_repr(entry)}")
        entry_id = entry.get("id")
        if not is_int(entry_id):
            raise self.fail(where, f"'id' must be an integer, got {short_repr(entry_id)}")
        entry_id = int(entry_id)
        where = f"{section}[{position}] (id {entry_id})"
        if entry_id in first_position:
            kind = "image" if section == "images" else "category"
            raise self.fail(where, f"duplicate {kind} id (also {section}[{first_position[entry_id]}])")
        return entry_id, where

    def images(self, images: list[Any]) -> dict[int, tuple[int, int]]:
        sizes: dict[int, tuple[int, int]] = {}
        first_position: dict[int, int] = {}
        for position, image in enumerate(images):
            image_id, where = self._entry_id("images", position, image, first_position)
            if self.require_file_name:
                file_name = image.get("file_name")
                if not isinstance(file_name, str) or not file_name or "\0" in file_name:
                    raise self.fail(where, f"'file_name' must be a non-empty string, got {short_repr(file_name)}")
            for key in ("height", "width"):
                if not is_int(image.get(key)) or not 0 < image[key] < _MAX_IMAGE_SIDE:
                    raise self.fail(where, f"{key!r} must be a positive integer, got {short_repr(image.get(key))}")
            sizes[image_id] = (int(image["height"]), int(image["width"]))
            first_position[image_id] = position
        return sizes

    def categories(self, categories: list[Any]) -> dict[int, str]:
        names: dict[int, str] = {}
        first_position: dict[int, int] = {}
        for position, category in enumerate(categories):
            category_id, where = self._entry_id("categories", position, category, first_position)
            name = category.get("name")
            if not isinstance(name, str) and (self.require_category_name or name is not None):
                raise self.fail(where, f"'name' must be a string, got {short_repr(name)}")
            names[category_id] = name if isinstance(name, str) else str(category_id)
            first_position[category_id] = position
        if not names:
            raise self.fail("top level", "'categories' is empty")
        return names

    def annotations(
        self,
        annotations: list[Any],
        image_sizes: Mapping[int, tuple[int, int]],
        category_names: Mapping[int, str],
        require_segmentation: str,
    ) -> list[int]:
        """Validate every annotation; return the positions of those without ``segmentation``."""
        first_position: dict[int, int] = {}
        missing_segmentation: list[int] = []
        compressed: list[tuple[int, str, str | bytes, int]] = []  # (position, where, counts, H*W)
        for position, annotation in enumerate(annotations):
            where = f"annotations[{position}]"
            if not isinstance(annotation, Mapping):
                raise self.fail(where, f"must be an object, got {short_repr(annotation)}")
            annotation_id = annotation.get("id")
            if not is_int(annotation_id):
                raise self.fail(where, f"'id' must be an integer, got {short_repr(annotation_id)}")
            annotation_id = int(annotation_id)
            where = f"annotations[{position}] (id {annotation_id})"
            if annotation_id in first_position:
                raise self.fail(where, f"duplicate annotation id (also annotations[{first_position[annotation_id]}])")
            first_position[annotation_id] = position
            image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
            if not is_int(image_id) or int(image_id) not in image_sizes:
                raise self.fail(where, f"'image_id' {short_repr(image_id)} is not an image id listed in 'images'")
            if not is_int(category_id) or int(category_id) not in category_names:
                raise self.fail(
                    where, f"'category_id' {short_repr(category_id)} is not a category id listed in 'categories'"
                )
            iscrowd = annotation.get("iscrowd", 0)
            if not isinstance(iscrowd, int | np.integer) or iscrowd not in (0, 1):
                raise self.fail(where, f"'iscrowd' must be 0 or 1, got {short_repr(iscrowd)}")
            bbox = annotation.get("bbox")
            if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and set(map(type, bbox)) <= _NUMBER_TYPES):
                raise self.fail(
                    where, f"'bbox' must be [x, y, width, height] of finite numbers, got {short_repr(bbox)}"
                )
            if not all(map(is_real, bbox)):
                raise self.fail(
                    where, f"'bbox' must be [x, y, width, height] of finite numbers, got {short_repr(bbox)}"
                )
            if bbox[2] < 0 or bbox[3] < 0:
                raise self.fail(where, f"'bbox' has a negative width or height: {short_repr(bbox)}")
            if "area" in annotation:
                if not (is_real(annotation["area"]) and annotation["area"] >= 0):
                    raise self.fail(where, f"'area' must be a finite number >= 0, got {short_repr(annotation['area'])}")
            elif self.require_area:
                raise self.fail(
                    where, "no 'area' (evaluation takes the size bucket from the GT area, never recomputed)"
                )
            height, width = image_sizes[int(image_id)]
            if "segmentation" not in annotation:
                missing_segmentation.append(position)
                if require_segmentation == "all" or (require_segmentation == "non_crowd" and not iscrowd):
                    raise self.fail(where, "no 'segmentation' (needed for masks)")
                continue
            where = f"annotations[{position}] (id {annotation_id}, image id {int(image_id)})"
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list):
                problem = _polygon_problem(segmentation, height, width)
            elif isinstance(segmentation, Mapping):
                counts = segmentation.get("counts")
                if (
                    isinstance(counts, str | bytes)
                    and rle_size_problem(segmentation.get("size"), height, width) is None
                ):
                    compressed.append((position, where, counts, height * width))  # checked below, all at once
                    continue
                problem = rle_problem(segmentation, height, width)
            else:
                problem = f"'segmentation' must be a polygon list or an RLE dict, got {type(segmentation).__name__}"
            if problem is not None:
                raise self.fail(where, problem)
        if compressed:
            codes, sums = check_compressed_rles([c[2] for c in compressed], [c[3] for c in compressed])
            bad = np.flatnonzero(codes)
            if bad.size:
                _, where, counts, area = compressed[int(bad[0])]
                raise self.fail(where, rle_string_problem_text(int(codes[bad[0]]), int(sums[bad[0]]), area, counts))
        return missing_segmentation


def validate_instances(
    content: Any,
    source: str,
    *,
    require_file_name: bool = True,
    require_category_name: bool = True,
    require_area: bool = False,
    require_segmentation: Literal["none", "non_crowd", "all"] = "none",
) -> COCOInstances:
    """Validate a parsed COCO instances file (``images``, ``annotations``, ``categories``).

    Rules (all callers): top-level keys present and lists; image, category and annotation ids integers and unique;
    image ``height`` / ``width`` positive integers; at least one category; annotations pointing at listed images and
    categories; ``iscrowd`` 0 or 1; ``bbox`` 4 finite numbers with width, height >= 0; ``area`` (when present) finite
    and >= 0; polygons lists of >= 6 (even count) finite numbers within one image size of the image; RLEs of the
    image's size, compressed strings that decode (:func:`check_compressed_rles`) or lists of non-negative integers,
    with runs summing to ``height * width``.

    Args:
        content: The parsed JSON.
        source: The file name (or ``"<dict>"``), first in every message.
        require_file_name: Images need a non-empty ``file_name`` (datasets that read the images).
        require_category_name: Categories need a string ``name`` (else the id, as text, is the name).
        require_area: Annotations need ``area`` (evaluation: pycocotools takes the size bucket from it).
        require_segmentation: ``"all"`` / ``"non_crowd"`` annotations need ``segmentation``; ``"none"``: optional (the
            positions of those without are returned).

    Returns:
        The validated file; see :class:`COCOInstances`.

    Raises:
        COCOFormatError: The first problem found, naming ``source``, the record and the problem.
    """
    validator = _InstancesValidator(source, require_file_name, require_category_name, require_area)
    checked = validator.top_level(content)
    image_sizes = validator.images(checked["images"])
    category_names = validator.categories(checked["categories"])
    missing = validator.annotations(checked["annotations"], image_sizes, category_names, require_segmentation)
    return COCOInstances(
        images=checked["images"],
        image_sizes=image_sizes,
        category_names=category_names,
        annotations=checked["annotations"],
        missing_segmentation=missing,
        content=checked,
    )
