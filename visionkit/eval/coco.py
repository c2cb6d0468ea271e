"""COCO box and mask AP on the faster-coco-eval engine, with pycocotools-identical numbers and its traps guarded.

The engine is ``faster_coco_eval`` (C++ ``evaluate``/``accumulate``); the 12 summary stats equal pycocotools'
``COCOeval.stats`` (tests check ``|diff| <= 1e-12``). Around it this module guards the known pycocotools traps
(traps table of ``shared/reference/conventions.md``):

1. GT annotation ``id`` 0 — a match to id 0 is counted as a false positive by pycocotools. GT annotations are
   renumbered ``1..N`` (in file order, which keeps every match and tie-break identical) on private copies.
2. ``segm`` results carrying ``bbox`` — pycocotools would take the box area for the size split. The box is dropped and
   area / box are recomputed from the mask, as pycocotools does for mask-only results.
3. Empty results — pycocotools raises ``IndexError``. Here all 12 stats are ``0.0`` (documented choice).
4. ``maxDets`` without 100 — ``stats[0]`` looks for 100. ``max_dets`` must be 3 increasing values ending in 100.
5. Results whose ``image_id`` / ``category_id`` is not in the GT are an error naming the ids (pycocotools asserts on
   image ids and silently ignores unknown categories).

Conventions of the returned numbers: fractions in ``[0, 1]``; a summary stat is ``-1.0`` exactly where pycocotools
reports ``-1`` (no GT in that area range); per-class ``AP/<name>`` (area "all", 100 detections, mean over the 10 IoU
thresholds, as detectron2) is ``nan`` for a class without non-crowd GT in the evaluated images. The caller's dicts
are never modified (pycocotools and faster-coco-eval write ``ignore``/``rle``/``area`` into them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faster_coco_eval
import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as engine_mask

from visionkit.eval.rle import to_compressed_rle

__all__ = ["COCO_ENGINE", "COCO_STAT_NAMES", "COCOEvalResult", "COCOGroundTruth", "evaluate_coco", "format_coco_table"]

IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# The 12 entries of pycocotools' ``COCOeval.stats`` in order (``COCOeval.summarize``), for maxDets (1, 10, 100).
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
DEFAULT_MAX_DETS: tuple[int, int, int] = (1, 10, 100)
# Which engine computed the numbers, for logs and result files.
COCO_ENGINE = f"faster-coco-eval {faster_coco_eval.__version__}"
# The single category that ``class_agnostic=True`` merges every class into.
AGNOSTIC_CATEGORY: dict[str, Any] = {"id": 1, "name": "object", "supercategory": "object"}
_MAX_IDS_IN_MESSAGE = 10


def _silent(*args: object, **kwargs: object) -> None:
    """Print function handed to faster-coco-eval so that nothing reaches stdout."""


def _ids_text(ids: set[int] | set[Any]) -> str:
    """Sorted, truncated list of ids for an error message."""
    try:
        ordered = sorted(ids)
    except TypeError:  # mixed types, e.g. an int and a str id
        ordered = sorted(ids, key=repr)
    shown = ", ".join(repr(i) for i in ordered[:_MAX_IDS_IN_MESSAGE])
    more = f" and {len(ordered) - _MAX_IDS_IN_MESSAGE} more" if len(ordered) > _MAX_IDS_IN_MESSAGE else ""
    return f"[{shown}{more}]"


def _read_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning every failure into an error that names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what} as JSON ({error})") from error


def _as_int_id(value: Any) -> int | None:
    """``value`` as a python int if it is an integer id (not bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def _validate_max_dets(max_dets: Sequence[int]) -> list[int]:
    """Check that ``max_dets`` has the 3-entry, ends-in-100 layout pycocotools' ``summarize`` assumes."""
    values = [int(m) for m in max_dets]
    if len(values) != 3 or values != sorted(set(values)) or values[0] < 1 or values[-1] != 100:
        raise ValueError(
            f"max_dets must be 3 increasing positive ints ending in 100 (pycocotools' summarize reads AP at 100 "
            f"detections), got {tuple(max_dets)}"
        )
    return values


def stat_names_for(max_dets: Sequence[int]) -> tuple[str, ...]:
    """Names of the 12 stats for a ``max_dets`` triple (``AR1, AR10, AR100`` become ``AR<m>``)."""
    ar_names = tuple(f"AR{m}" for m in max_dets)
    return (*COCO_STAT_NAMES[:6], *ar_names, *COCO_STAT_NAMES[9:])


@dataclass(frozen=True)
class COCOEvalResult:
    """Result of one COCO evaluation.

    Attributes:
        iou_type: ``"bbox"`` or ``"segm"``.
        stats: ``(12,)`` float64, pycocotools' ``COCOeval.stats`` (``0.0`` everywhere for empty results).
        stat_names: Names of ``stats`` (``COCO_STAT_NAMES`` for the default ``max_dets``).
        per_class_ap: Category name → AP@[.5:.95] (``nan`` where the class has no non-crowd GT), by category id.
        num_results: Number of result records evaluated.
    """

    iou_type: str
    stats: np.ndarray
    stat_names: tuple[str, ...] = COCO_STAT_NAMES
    per_class_ap: dict[str, float] = field(default_factory=dict)
    num_results: int = 0

    def as_dict(self) -> dict[str, float]:
        """The 12 stats by name, then ``AP/<category name>`` for every category."""
        metrics = {name: float(value) for name, value in zip(self.stat_names, self.stats, strict=True)}
        metrics.update({f"AP/{name}": ap for name, ap in self.per_class_ap.items()})
        return metrics


class COCOGroundTruth:
    """Validated COCO instances ground truth, indexed once and evaluated against any number of result sets.

    Args:
        gt: Path to a COCO instances JSON file, or the parsed dict (``images``, ``annotations``, ``categories``).
            The dict is not modified.
        class_agnostic: Merge every category into one (``AGNOSTIC_CATEGORY``) in GT and results.

    Raises:
        FileNotFoundError: If ``gt`` is a path that does not exist.
        ValueError: If the file is not JSON or the content is not a valid COCO instances set (the message names the
            file, or ``<dict>``, and the offending entries).
    """

    def __init__(self, gt: str | Path | Mapping[str, Any], class_agnostic: bool = False) -> None:
        if isinstance(gt, str | Path):
            self.source = str(gt)
            dataset = _read_json(Path(gt), "COCO ground-truth")
        elif isinstance(gt, Mapping):
            self.source = "<dict>"
            dataset = gt
        else:
            raise TypeError(f"gt must be a path or a COCO instances dict, got {type(gt).__name__}")
        self.class_agnostic = class_agnostic
        self._parse(dataset)

    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {message}")

    def _parse(self, dataset: Any) -> None:
        """Validate ``dataset`` and build the engine index on renumbered private copies of the annotations."""
        if not isinstance(dataset, Mapping):
            raise self._error(f"COCO ground truth must be a JSON object, got {type(dataset).__name__}")
        missing = [key for key in ("images", "annotations", "categories") if not isinstance(dataset.get(key), list)]
        if missing:
            raise self._error(f"COCO ground truth needs list(s) {missing} (instances format)")

        images: list[dict[str, Any]] = []
        self.image_sizes: dict[int, tuple[int, int]] = {}
        for index, image in enumerate(dataset["images"]):
            image_id = _as_int_id(image.get("id")) if isinstance(image, Mapping) else None
            if image_id is None or not all(isinstance(image.get(k), int | np.integer) for k in ("height", "width")):
                raise self._error(f"images[{index}] needs integer 'id', 'height' and 'width', got {image!r}")
            if image_id in self.image_sizes:
                raise self._error(f"duplicate image id {image_id}")
            self.image_sizes[image_id] = (int(image["height"]), int(image["width"]))
            images.append({"id": image_id, "height": int(image["height"]), "width": int(image["width"])})

        self.category_names: dict[int, str] = {}
        for index, category in enumerate(dataset["categories"]):
            category_id = _as_int_id(category.get("id")) if isinstance(category, Mapping) else None
            if category_id is None:
                raise self._error(f"categories[{index}] needs an integer 'id', got {category!r}")
            if category_id in self.category_names:
                raise self._error(f"duplicate category id {category_id}")
            self.category_names[category_id] = str(category.get("name", category_id))
        self.category_ids: list[int] = sorted(self.category_names)

        annotations, missing_segmentation = self._copy_annotations(dataset["annotations"])
        self._missing_segmentation = missing_segmentation
        categories = (
            [dict(AGNOSTIC_CATEGORY)]
            if self.class_agnostic
            else [{"id": cid, "name": self.category_names[cid]} for cid in self.category_ids]
        )
        self._images = images
        self._categories = categories
        self._coco = COCO(print_function=_silent)
        self._coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
        self._coco.createIndex()

    def _copy_annotations(self, raw_annotations: list[Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """Validated shallow copies of the GT annotations, renumbered ``1..N`` (trap 1: id 0)."""
        annotations: list[dict[str, Any]] = []
        missing_segmentation: list[int] = []
        unknown_images: set[Any] = set()
        unknown_categories: set[Any] = set()
        for index, raw in enumerate(raw_annotations):
            if not isinstance(raw, Mapping):
                raise self._error(f"annotations[{index}] must be an object, got {type(raw).__name__}")
            absent = [key for key in ("image_id", "category_id", "bbox", "area") if key not in raw]
            if absent:
                raise self._error(f"annotations[{index}] (id {raw.get('id')!r}) lacks {absent}")
            bbox = raw["bbox"]
            if not isinstance(bbox, Sequence) or len(bbox) != 4:
                raise self._error(
                    f"annotations[{index}] (id {raw.get('id')!r}) bbox must be [x, y, w, h], got {bbox!r}"
                )
            annotation = dict(raw)
            image_id = _as_int_id(raw["image_id"])
            category_id = _as_int_id(raw["category_id"])
            if image_id not in self.image_sizes:
                unknown_images.add(raw["image_id"])
            if category_id not in self.category_names:
                unknown_categories.add(raw["category_id"])
            if "segmentation" not in raw:
                missing_segmentation.append(index)
            annotation["id"] = index + 1
            annotation["image_id"] = image_id
            annotation["category_id"] = AGNOSTIC_CATEGORY["id"] if self.class_agnostic else category_id
            annotation["iscrowd"] = int(raw.get("iscrowd", 0))  # pycocotools treats a missing flag as 0
            annotations.append(annotation)
        if unknown_images:
            raise self._error(f"annotations refer to image ids not in 'images': {_ids_text(unknown_images)}")
        if unknown_categories:
            raise self._error(f"annotations refer to category ids not in 'categories': {_ids_text(unknown_categories)}")
        return annotations, missing_segmentation

    @property
    def image_ids(self) -> list[int]:
        """Ids of every GT image, sorted."""
        return sorted(self.image_sizes)

    def evaluate(
        self,
        results: str | Path | Sequence[Mapping[str, Any]],
        iou_type: IouType = "bbox",
        image_ids: Sequence[int] | None = None,
        max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    ) -> COCOEvalResult:
        """Evaluate COCO result records against this ground truth.

        Args:
            results: Path to a results JSON (a list of records) or the list of records
                (``image_id``, ``category_id`` (dataset id), ``score``, and ``bbox`` ``[x, y, w, h]`` for ``"bbox"`` or
                ``segmentation`` compressed/uncompressed RLE of the image size for ``"segm"``). Not modified.
            iou_type: ``"bbox"`` or ``"segm"``.
            image_ids: Evaluate on these GT images only (``params.imgIds``); ``None`` means every GT image.
                Results on other images are ignored.
            max_dets: Detections per image for the AR stats; 3 increasing ints ending in 100.

        Returns:
            The evaluation result; see ``COCOEvalResult``.

        Raises:
            ValueError: For an unknown ``iou_type`` or ``max_dets``, malformed records, ids missing from the GT
                (names the ids and the results file), or GT annotations without ``segmentation`` for ``"segm"``.
        """
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        max_dets_list = _validate_max_dets(max_dets)
        if iou_type == "segm" and self._missing_segmentation:
            first = self._missing_segmentation[0]
            raise self._error(
                f"{len(self._missing_segmentation)} GT annotation(s) have no 'segmentation' (first: annotations"
                f"[{first}]); mask AP needs one on every annotation"
            )
        if isinstance(results, str | Path):
            results_source = str(results)
            records = _read_json(Path(results), "COCO results")
            if not isinstance(records, list):
                raise ValueError(f"{results_source}: COCO results must be a JSON list, got {type(records).__name__}")
        else:
            results_source = "<results>"
            records = results
        detections = self._convert_results(records, iou_type, results_source)

        if image_ids is None:
            eval_image_ids = self.image_ids
        else:
            eval_image_ids = sorted({int(i) for i in image_ids})
            unknown = set(eval_image_ids) - self.image_sizes.keys()
            if unknown:
                raise self._error(f"image_ids not in the ground truth: {_ids_text(unknown)}")
        names = stat_names_for(max_dets_list)
        if not eval_image_ids:
            return COCOEvalResult(iou_type, np.zeros(12), names, dict.fromkeys(self._class_names(), math.nan), 0)

        coco_dt = COCO(print_function=_silent)
        coco_dt.dataset = {"images": self._images, "annotations": detections, "categories": self._categories}
        coco_dt.createIndex()
        engine = COCOeval_faster(self._coco, coco_dt, iou_type, print_function=_silent)
        engine.params.imgIds = eval_image_ids
        engine.params.maxDets = max_dets_list
        engine.evaluate()
        engine.accumulate()
        engine.summarize()
        stats = np.asarray(engine.stats[:12], dtype=np.float64)
        if not detections:
            stats = np.zeros(12)  # documented choice for empty results (pycocotools raises, trap 3)
        return COCOEvalResult(iou_type, stats, names, self._per_class_ap(engine), len(detections))

    def _class_names(self) -> list[str]:
        """Per-class metric names in category-id order; duplicate names get their id appended."""
        if self.class_agnostic:
            return []
        names = [self.category_names[cid] for cid in self.category_ids]
        duplicated = {name for name in names if names.count(name) > 1}
        return [
            f"{name} (id {cid})" if name in duplicated else name
            for name, cid in zip(names, self.category_ids, strict=True)
        ]

    def _per_class_ap(self, engine: COCOeval_faster) -> dict[str, float]:
        """AP@[.5:.95] per category from ``eval['precision']`` ``[T, R, K, A, M]`` at area "all", last maxDets."""
        names = self._class_names()
        if not names:
            return {}
        precision = np.asarray(engine.eval["precision"])[:, :, :, 0, -1]
        per_class: dict[str, float] = {}
        for k, name in enumerate(names):
            values = precision[:, :, k]
            valid = values[values > -1]
            per_class[name] = float(valid.mean()) if valid.size else math.nan
        return per_class

    def _convert_results(
        self, records: Sequence[Mapping[str, Any]], iou_type: str, source: str
    ) -> list[dict[str, Any]]:
        """Validate result records and build the engine's detection annotations (what ``loadRes`` would build)."""
        geometry_key = "bbox" if iou_type == "bbox" else "segmentation"
        try:
            image_ids = [record["image_id"] for record in records]
            category_ids = [record["category_id"] for record in records]
            scores = [record["score"] for record in records]
            geometries = [record[geometry_key] for record in records]
        except (KeyError, TypeError, IndexError):
            raise self._malformed_record_error(records, geometry_key, source) from None
        if not records:
            return []

        try:
            unknown_images = set(image_ids) - self.image_sizes.keys()
            unknown_categories = set(category_ids) - self.category_names.keys()
        except TypeError:  # an unhashable id, e.g. a list
            raise ValueError(f"{source}: result 'image_id' and 'category_id' must be integers") from None
        if unknown_images or unknown_categories:
            parts = []
            if unknown_images:
                parts.append(f"image ids not in the ground truth {_ids_text(unknown_images)}")
            if unknown_categories:
                parts.append(f"category ids not in the ground truth {_ids_text(unknown_categories)}")
            raise ValueError(f"{source}: results refer to {' and '.join(parts)} (ground truth: {self.source})")
        try:
            score_array = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: every result 'score' must be a number") from None
        if score_array.shape != (len(records),) or not np.isfinite(score_array).all():
            raise ValueError(f"{source}: every result 'score' must be a finite number")

        if iou_type == "bbox":
            areas = self._bbox_areas(geometries, source)
        else:
            geometries, areas, boxes = self._mask_geometry(geometries, image_ids, source)
        label = AGNOSTIC_CATEGORY["id"] if self.class_agnostic else None
        detections = []
        for index, (image_id, category_id, score, geometry, area) in enumerate(
            zip(image_ids, category_ids, score_array.tolist(), geometries, areas, strict=True)
        ):
            detection = {
                "id": index + 1,
                "image_id": int(image_id),
                "category_id": label if label is not None else int(category_id),
                "score": score,
                "area": area,
                "iscrowd": 0,
            }
            if iou_type == "bbox":
                detection["bbox"] = geometry
            else:
                detection["segmentation"] = geometry
                detection["bbox"] = boxes[index]
            detections.append(detection)
        return detections

    @staticmethod
    def _bbox_areas(boxes: list[Any], source: str) -> list[float]:
        """``w * h`` per box (pycocotools' ``loadRes`` area), after checking every box is 4 finite numbers."""
        try:
            array = np.asarray(boxes, dtype=np.float64)
        except (TypeError, ValueError):
            array = np.empty(0)
        if array.shape != (len(boxes), 4):
            bad = next(
                (i for i, box in enumerate(boxes) if not isinstance(box, Sequence | np.ndarray) or len(box) != 4), 0
            )
            raise ValueError(f"{source}: result {bad} 'bbox' must be [x, y, w, h] (4 numbers), got {boxes[bad]!r}")
        if not np.isfinite(array).all() or (array[:, 2:] < 0).any():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1) | (array[:, 2:] < 0).any(axis=1))[0])
            raise ValueError(f"{source}: result {bad} 'bbox' must be finite with w, h >= 0, got {boxes[bad]!r}")
        return (array[:, 2] * array[:, 3]).tolist()

    def _mask_geometry(
        self, segmentations: list[Any], image_ids: list[Any], source: str
    ) -> tuple[list[dict[str, Any]], list[float], list[list[float]]]:
        """Check RLE sizes against the images; return RLEs, mask areas and mask boxes (bbox dropped, trap 2)."""
        rles = []
        for index, (segmentation, image_id) in enumerate(zip(segmentations, image_ids, strict=True)):
            if not isinstance(segmentation, Mapping) or "size" not in segmentation or "counts" not in segmentation:
                raise ValueError(
                    f"{source}: result {index} 'segmentation' must be an RLE dict with 'size' and 'counts' "
                    f"(polygons are not accepted as results), got {type(segmentation).__name__}"
                )
            size = tuple(int(v) for v in segmentation["size"])
            if size != self.image_sizes[image_id]:
                raise ValueError(
                    f"{source}: result {index} mask size {list(size)} differs from image {image_id} size "
                    f"{list(self.image_sizes[image_id])} (masks must be at original image resolution)"
                )
            counts = segmentation["counts"]
            rles.append(segmentation if isinstance(counts, str | bytes) else to_compressed_rle(segmentation))
        # faster-coco-eval's batch calls: pycocotools' ``area`` overflows a uint8 counter beyond 255 RLEs.
        areas = engine_mask.area(rles).astype(np.float64).tolist()
        boxes = engine_mask.toBbox(rles).tolist()
        return rles, areas, boxes

    @staticmethod
    def _malformed_record_error(records: Sequence[Any], geometry_key: str, source: str) -> ValueError:
        """Find the first malformed record and describe it."""
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                return ValueError(f"{source}: result {index} must be a dict, got {type(record).__name__}")
            absent = [key for key in ("image_id", "category_id", "score", geometry_key) if key not in record]
            if absent:
                return ValueError(f"{source}: result {index} lacks {absent} (needed for this iou_type)")
        return ValueError(f"{source}: results must be a list of dicts")


def evaluate_coco(
    gt: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: IouType = "bbox",
    class_agnostic: bool = False,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
) -> dict[str, float]:
    """COCO AP / AR of ``results`` against ``gt``, identical to pycocotools' ``COCOeval``, several times faster.

    Args:
        gt: COCO instances JSON path or dict (not modified).
        results: Results JSON path (a list of records) or the list of result records (not modified).
        iou_type: ``"bbox"`` or ``"segm"``. For ``"segm"`` any ``bbox`` in the records is ignored.
        class_agnostic: Merge all categories into one before evaluating (no per-class keys then).
        max_dets: 3 increasing ints ending in 100.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (pycocotools' 12 stats in order; ``-1``
        where pycocotools reports it; all ``0.0`` for empty results), then ``AP/<category name>`` per category
        (``nan`` for a class without non-crowd GT). Fractions in ``[0, 1]``.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: For invalid GT or results; the message names the file and the problem.
    """
    ground_truth = COCOGroundTruth(gt, class_agnostic=class_agnostic)
    return ground_truth.evaluate(results, iou_type=iou_type, max_dets=max_dets).as_dict()


def _format_value(value: float) -> str:
    """``n/a`` for pycocotools' -1 sentinel and for nan, else 4 decimals."""
    return "n/a" if math.isnan(value) or value == -1 else f"{value:.4f}"


def format_coco_table(stats: Mapping[str, float], title: str, prefix: str = "", columns: int = 3) -> str:
    """Plain-text table of the 12 COCO stats and the per-class AP, for printing or logging.

    Args:
        stats: What ``evaluate_coco`` returns (or ``COCOEvaluator.compute``'s dict with ``prefix="bbox_"``).
        title: First line of the table.
        prefix: Key prefix to strip (e.g. ``"segm_"``).
        columns: Per-class ``name AP`` pairs per row.

    Returns:
        The table; ``n/a`` marks ``-1`` / ``nan`` (no GT for that entry).
    """
    summary = {key[len(prefix) :]: value for key, value in stats.items() if key.startswith(prefix)}
    stat_names = [name for name in summary if not name.startswith("AP/")]
    width = max((len(name) for name in stat_names), default=6)
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{name:<{width}}  {_format_value(float(summary[name])):>8}" for name in stat_names]
    per_class = [(name[3:], float(value)) for name, value in summary.items() if name.startswith("AP/")]
    if per_class:
        name_width = max(len(name) for name, _ in per_class)
        lines += ["", "per-class AP"]
        for start in range(0, len(per_class), columns):
            row = per_class[start : start + columns]
            lines.append("   ".join(f"{name:<{name_width}}  {_format_value(ap):>8}" for name, ap in row).rstrip())
    return "\n".join(lines)
