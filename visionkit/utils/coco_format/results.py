"""Validation of COCO result records (``image_id``, ``category_id``, ``score``, ``bbox`` and / or ``segmentation``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionkit.utils.coco_format.common import COCOFormatError, is_int, is_real, short_repr
from visionkit.utils.coco_format.rle import (
    check_compressed_rles,
    rle_problem,
    rle_size_problem,
    rle_string_problem_text,
)

__all__ = ["COCOResults", "validate_result_masks", "validate_results"]


@dataclass(frozen=True)
class COCOResults:
    """Columns of validated COCO result records (the records themselves are not modified).

    Attributes:
        records: The records, as given.
        image_ids: ``(N,)`` int64.
        category_ids: ``(N,)`` int64.
        scores: ``(N,)`` float64, finite.
        boxes: ``(N, 4)`` float64 ``[x, y, w, h]`` in pixels (finite, ``w, h >= 0``); NaN rows where ``has_box`` is
            False.
        has_box: ``(N,)`` bool: the record has a non-empty ``bbox`` (pycocotools' ``loadRes`` test: key present and
            not ``[]``).
        has_segmentation: ``(N,)`` bool: the record has a ``segmentation`` (not validated yet; see
            :func:`validate_result_masks`).
        source: The results file name (or ``"<results>"``), for messages.
    """

    records: Sequence[Mapping[str, Any]]
    image_ids: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    has_box: np.ndarray
    has_segmentation: np.ndarray
    source: str


def _ids_text(ids: Collection[Any], limit: int = 10) -> str:
    """Sorted, truncated list of ids for an error message."""
    try:
        ordered = sorted(ids)
    except TypeError:
        ordered = sorted(ids, key=repr)
    shown = ", ".join(repr(int(i)) if is_int(i) else repr(i) for i in ordered[:limit])
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"[{shown}{more}]"


def _column(records: Sequence[Any], key: str, source: str) -> list[Any]:
    """``[record[key] for record in records]``, or an error naming the first record that is not a dict or lacks it."""
    try:
        return [record[key] for record in records]
    except (KeyError, TypeError, IndexError):
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise COCOFormatError(
                    f"{source}: result {index}: must be a dict, got {type(record).__name__}"
                ) from None
            if key not in record:
                hint = " (captions are not supported: visionkit evaluates bbox and segm)" if "caption" in record else ""
                raise COCOFormatError(f"{source}: result {index}: lacks {key!r}{hint}") from None
        raise


def _integer_column(values: list[Any], key: str, source: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        array = np.asarray([None])
    if array.shape == (len(values),) and (array.dtype.kind in "iu" or (array.size == 0)):
        return array.astype(np.int64)
    bad = next((i for i, v in enumerate(values) if not (is_int(v) and -(2**63) <= v < 2**63)), 0)
    raise COCOFormatError(f"{source}: result {bad}: {key!r} must be an integer, got {short_repr(values[bad])}")


def _box_column(records: Sequence[Mapping[str, Any]], source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 4)`` boxes (NaN where absent) and ``has_box``; absent and ``[]`` boxes count as no box."""
    raw = [record.get("bbox", ()) for record in records]
    has_box = np.fromiter((not (isinstance(b, list | tuple) and len(b) == 0) for b in raw), bool, len(raw))
    present = [b for b, keep in zip(raw, has_box, strict=True) if keep]
    try:
        array = np.asarray(present) if present else np.zeros((0, 4))
    except (ValueError, TypeError, OverflowError):
        array = np.asarray([None])
    if array.shape != (len(present), 4) or array.dtype.kind not in "iuf":
        for index in np.flatnonzero(has_box):
            box = raw[index]
            if not (isinstance(box, Sequence | np.ndarray) and len(box) == 4 and all(map(is_real, box))):
                raise COCOFormatError(
                    f"{source}: result {index}: 'bbox' must be [x, y, w, h] (4 numbers) or absent, "
                    f"got {short_repr(box)}"
                )
        array = np.asarray(present, dtype=np.float64)
    array = array.astype(np.float64, copy=False).reshape(-1, 4)
    invalid = ~np.isfinite(array).all(axis=1) | (array[:, 2:] < 0).any(axis=1)
    if invalid.any():
        index = int(np.flatnonzero(has_box)[np.flatnonzero(invalid)[0]])
        raise COCOFormatError(
            f"{source}: result {index}: 'bbox' must be finite with w, h >= 0, got {short_repr(raw[index])}"
        )
    boxes = np.full((len(raw), 4), np.nan)
    boxes[has_box] = array
    return boxes, has_box


def validate_results(
    records: Any,
    source: str,
    image_sizes: Mapping[int, tuple[int, int]],
    category_ids: Collection[int],
) -> COCOResults:
    """Validate COCO result records against a ground truth and return them as columns.

    Rules: a list of dicts, each with integer ``image_id`` and ``category_id`` that the ground truth lists and a
    finite number ``score``; ``bbox``, where present and not ``[]``, 4 finite numbers with ``w, h >= 0``. The
    ``segmentation`` masks are checked by :func:`validate_result_masks` (only for the records whose masks are used).
    Any ``area`` key is ignored (pycocotools' ``loadRes`` overwrites it too).

    Args:
        records: The parsed results (a list of dicts).
        source: The results file name (or ``"<results>"``), first in every message.
        image_sizes: Ground-truth image id → ``(height, width)``.
        category_ids: Ground-truth category ids.

    Returns:
        The columns; see :class:`COCOResults`.

    Raises:
        COCOFormatError: Naming ``source``, the first bad record (``result <index>``) and the problem, or every
            unknown image / category id.
    """
    if not isinstance(records, Sequence) or isinstance(records, str | bytes | Mapping):
        raise COCOFormatError(f"{source}: COCO results must be a JSON list, got {type(records).__name__}")
    image_ids = _integer_column(_column(records, "image_id", source), "image_id", source)
    category_column = _integer_column(_column(records, "category_id", source), "category_id", source)
    score_values = _column(records, "score", source)
    known_images = np.fromiter(image_sizes, np.int64, len(image_sizes))
    known_categories = np.fromiter(category_ids, np.int64, len(category_ids))
    unknown_images = set(image_ids[~np.isin(image_ids, known_images)].tolist())
    unknown_categories = set(category_column[~np.isin(category_column, known_categories)].tolist())
    if unknown_images or unknown_categories:
        parts = []
        if unknown_images:
            parts.append(f"image ids not in the ground truth {_ids_text(unknown_images)}")
        if unknown_categories:
            parts.append(f"category ids not in the ground truth {_ids_text(unknown_categories)}")
        first = int(np.flatnonzero(~np.isin(image_ids, known_images) | ~np.isin(category_column, known_categories))[0])
        raise COCOFormatError(f"{source}: results refer to {' and '.join(parts)} (first: result {first})")
    try:
        scores = np.asarray(score_values)
    except (ValueError, TypeError, OverflowError):
        scores = np.asarray([None])
    if scores.shape != (len(records),) or (scores.size and scores.dtype.kind not in "iuf"):
        bad = next((i for i, v in enumerate(score_values) if not is_real(v)), 0)
        raise COCOFormatError(
            f"{source}: result {bad}: 'score' must be a finite number, got {short_repr(score_values[bad])}"
        )
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise COCOFormatError(f"{source}: result {bad}: 'score' must be a finite number, got {score_values[bad]!r}")
    boxes, has_box = _box_column(records, source)
    has_segmentation = np.fromiter(("segmentation" in record for record in records), bool, len(records))
    return COCOResults(records, image_ids, category_column, scores, boxes, has_box, has_segmentation, source)


def _mask_sizes(segmentations: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 2)`` int64 ``size`` of every compressed RLE dict and whether it is one (fast path for result masks)."""
    count = len(segmentations)
    compressed = np.fromiter(
        (type(s) is dict and type(s.get("counts")) in (str, bytes) for s in segmentations), bool, count
    )
    sizes = np.full((count, 2), -1, np.int64)
    if compressed.any():
        raw = [segmentations[i].get("size") for i in np.flatnonzero(compressed)]
        try:
            array = np.asarray(raw)
        except (ValueError, TypeError, OverflowError):
            array = np.asarray([None])
        if array.shape == (len(raw), 2) and array.dtype.kind in "iu":
            sizes[compressed] = array
        else:  # some sizes are not two integers: sort them out one by one
            for i in np.flatnonzero(compressed):
                size = segmentations[i].get("size")
                if rle_size_problem(size, None, None) is None:
                    sizes[i] = [int(size[0]), int(size[1])]
    return sizes, compressed


def validate_result_masks(
    results: COCOResults, rows: np.ndarray | Sequence[int], image_sizes: Mapping[int, tuple[int, int]]
) -> list[dict[str, Any]]:
    """Validate the ``segmentation`` of some result records and return them as RLEs the engine can take.

    Every mask must be an RLE dict of its image's size: compressed (``str`` / ``bytes`` counts, all checked at once
    with :func:`check_compressed_rles`) or uncompressed (a list of non-negative ints); runs must sum to
    ``height * width``. Polygons are rejected (pycocotools' ``loadRes`` cannot take their area either).

    Args:
        results: From :func:`validate_results`.
        rows: Indices of the records whose masks are used; each must have a ``segmentation``.
        image_sizes: Ground-truth image id → ``(height, width)``.

    Returns:
        One RLE per row: the record's own dict for a compressed RLE, else ``{"size": [H, W], "counts": list[int]}``
        (convert those with pycocotools' or faster-coco-eval's ``frPyObjects``).

    Raises:
        COCOFormatError: Naming the results file, the first bad record (``result <index>``) and the problem.
    """
    row_array = np.asarray(rows, dtype=np.int64).reshape(-1)
    segmentations = [results.records[r]["segmentation"] for r in row_array.tolist()]
    known_ids = np.fromiter(image_sizes, np.int64, len(image_sizes))
    known_sizes = np.asarray(list(image_sizes.values()), dtype=np.int64).reshape(-1, 2)
    order = np.argsort(known_ids)
    expected = known_sizes[order[np.searchsorted(known_ids[order], results.image_ids[row_array])]]
    sizes, compressed = _mask_sizes(segmentations)
    fast = compressed & (sizes == expected).all(axis=1)
    rles: list[Any] = list(segmentations)
    first_problem: tuple[int, str] | None = None  # (row, problem) of the first bad mask outside the fast path
    for i in np.flatnonzero(~fast).tolist():
        segmentation, row = segmentations[i], int(row_array[i])
        height, width = (int(v) for v in expected[i])
        if isinstance(segmentation, list):
            problem = "must be an RLE dict with 'size' and 'counts' (polygons are not accepted as results)"
        else:
            problem = rle_problem(segmentation, height, width)
            if problem is not None and "differs from the image" in problem:
                size = [int(v) for v in segmentation["size"]]
                problem = (
                    f"mask size {size} differs from image {int(results.image_ids[row])} size [{height}, {width}] "
                    f"(masks must be at original image resolution)"
                )
        if problem is not None:
            first_problem = first_problem or (row, problem)
        elif isinstance(segmentation["counts"], str | bytes):
            rles[i] = {"size": [height, width], "counts": segmentation["counts"]}
        else:
            rles[i] = {"size": [height, width], "counts": [int(c) for c in segmentation["counts"]]}
    checked = np.flatnonzero(fast)
    if checked.size:
        counts = [segmentations[i]["counts"] for i in checked.tolist()]
        areas = expected[checked, 0] * expected[checked, 1]
        codes, sums = check_compressed_rles(counts, areas)
        bad = np.flatnonzero(codes)
        if bad.size and (first_problem is None or int(row_array[checked[bad[0]]]) < first_problem[0]):
            i = int(bad[0])
            text = rle_string_problem_text(int(codes[i]), int(sums[i]), int(areas[i]), counts[i])
            first_problem = (int(row_array[checked[i]]), text)
    if first_problem is not None:
        raise COCOFormatError(f"{results.source}: result {first_problem[0]}: 'segmentation' {first_problem[1]}")
    return rles
