"""COCO box and mask AP on the faster-coco-eval engine, with pycocotools-identical numbers and its traps guarded.

The engine is ``faster_coco_eval`` (C++ ``evaluate``/``accumulate``); the 12 summary stats equal pycocotools'
``COCOeval.stats`` (tests check ``|diff| <= 1e-12``). Ground truth and results are validated first by the one COCO
validator (``visionkit.utils.coco_format``, shared with ``COCODataset``): nothing malformed reaches the engine, and
every error names the file and the record. Around the engine this module guards the known pycocotools traps
(``docs/eval/coco.md`` lists them with their sources, and every ``loadRes`` branch):

1. GT annotation ``id`` 0 — a match to id 0 is counted as a false positive by pycocotools. GT annotations are
   renumbered ``1..N`` (in file order, which keeps every match and tie-break identical) on private copies.
2. ``segm`` results carrying ``bbox`` — pycocotools' ``loadRes`` takes the box area for the size split (mmdet's
   numbers), detectron2 drops the box first (mask area). Both are offered: ``segm_area="mask"`` (default) or
   ``"box"``; the choice is decided per record (a record without a non-empty box always uses its mask area).
3. Empty results — pycocotools raises ``IndexError``. Here all 12 stats are ``0.0`` (documented choice).
4. ``maxDets`` without 100 — ``stats[0]`` looks for 100. ``max_dets`` must be 3 increasing values ending in 100.
5. Results whose ``image_id`` / ``category_id`` is not in the GT are an error naming the ids (pycocotools asserts on
   image ids and silently ignores unknown categories).
6. The GT ``area`` decides the size bucket and is never recomputed (it is required); a result's own ``area`` is
   ignored, as ``loadRes`` overwrites it.

Conventions of the returned numbers: fractions in ``[0, 1]``; a summary stat is ``-1.0`` exactly where pycocotools
reports ``-1`` (no GT in that area range); per-class ``AP/<name>`` (area "all", 100 detections, mean over the 10 IoU
thresholds, as detectron2) is ``nan`` for a class without non-crowd GT in the evaluated images. The caller's dicts
are never modified (pycocotools and faster-coco-eval write ``ignore``/``rle``/``area`` into them).
"""

from __future__ import annotations

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
from visionkit.utils.coco_format import (
    COCOFormatError,
    read_coco_json,
    validate_instances,
    validate_result_masks,
    validate_results,
)

__all__ = [
    "COCO_ENGINE",
    "COCO_STAT_NAMES",
    "SEGM_AREAS",
    "COCOEvalResult",
    "COCOGroundTruth",
    "evaluate_coco",
    "format_coco_table",
    "iou_type_label",
]

IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# Where a segm detection's area (for the APs/APm/APl and ARs/ARm/ARl size split) comes from: "mask" = detectron2
# (drops the box, mask area), "box" = pycocotools' ``loadRes`` as is (box w*h when a box is given) = mmdet.
SegmArea = Literal["mask", "box"]
SEGM_AREAS: tuple[str, ...] = ("mask", "box")
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


def _validate_max_dets(max_dets: Sequence[int]) -> list[int]:
    """Check that ``max_dets`` has the 3-entry, ends-in-100 layout pycocotools' ``summarize`` assumes."""
    values = [int(m) for m in max_dets]
    if len(values) != 3 or values != sorted(set(values)) or values[0] < 1 or values[-1] != 100:
        raise ValueError(
            f"max_dets must be 3 increasing positive ints ending in 100 (pycocotools' summarize reads AP at 100 "
            f"detections), got {tuple(max_dets)}"
        )
    return values


def check_segm_area(segm_area: str) -> str:
    """Return ``segm_area`` after checking it is one of ``SEGM_AREAS``."""
    if segm_area not in SEGM_AREAS:
        raise ValueError(f"segm_area must be one of {SEGM_AREAS}, got {segm_area!r}")
    return segm_area


def iou_type_label(iou_type: str, segm_area: str = "mask") -> str:
    """Name of an evaluation for tables and metric files: ``"bbox"``, ``"segm (mask area)"``, ``"segm (box area)"``.

    Args:
        iou_type: ``"bbox"`` or ``"segm"``.
        segm_area: The segm size-split convention (``"mask"`` or ``"box"``); ignored for ``"bbox"``.

    Returns:
        The label.
    """
    return f"segm ({check_segm_area(segm_area)} area)" if iou_type == "segm" else iou_type


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
            dataset = read_coco_json(gt, "COCO ground-truth")
        elif isinstance(gt, Mapping):
            self.source = "<dict>"
            dataset = gt
        else:
            raise TypeError(f"gt must be a path or a COCO instances dict, got {type(gt).__name__}")
        self.class_agnostic = class_agnostic
        self._parse(dataset)

    def _error(self, message: str) -> COCOFormatError:
        return COCOFormatError(f"{self.source}: {message}")

    def _parse(self, dataset: Any) -> None:
        """Validate ``dataset`` (``visionkit.utils.coco_format``) and index renumbered private copies of the GT."""
        instances = validate_instances(
            dataset, self.source, require_file_name=False, require_category_name=False, require_area=True
        )
        self.image_sizes: dict[int, tuple[int, int]] = instances.image_sizes
        self.category_names: dict[int, str] = instances.category_names
        self.category_ids: list[int] = sorted(self.category_names)
        self._missing_segmentation = instances.missing_segmentation
        images = [{"id": image_id, "height": h, "width": w} for image_id, (h, w) in self.image_sizes.items()]
        annotations = []
        for index, raw in enumerate(instances.annotations):
            annotation = dict(raw)
            annotation["id"] = index + 1  # trap 1: ids 1..N in file order
            annotation["image_id"] = int(raw["image_id"])
            annotation["category_id"] = AGNOSTIC_CATEGORY["id"] if self.class_agnostic else int(raw["category_id"])
            annotation["iscrowd"] = int(raw.get("iscrowd", 0))  # pycocotools treats a missing flag as 0
            annotations.append(annotation)
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
        segm_area: SegmArea = "mask",
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
            segm_area: For ``"segm"``: the detection area used by the size split (APs/APm/APl, ARs/ARm/ARl).
                ``"mask"`` (detectron2): the mask area, any ``bbox`` ignored. ``"box"`` (pycocotools' ``loadRes`` as is,
                mmdet): ``w * h`` of the record's ``bbox`` where it has a non-empty one, else the mask area.
                Ignored for ``"bbox"``. See ``docs/eval/coco.md``.

        Returns:
            The evaluation result; see ``COCOEvalResult``.

        Raises:
            ValueError: For an unknown ``iou_type`` or ``max_dets``, malformed records, ids missing from the GT
                (names the ids and the results file), or GT annotations without ``segmentation`` for ``"segm"``.
        """
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        max_dets_list = _validate_max_dets(max_dets)
        check_segm_area(segm_area)
        if iou_type == "segm" and self._missing_segmentation:
            first = self._missing_segmentation[0]
            raise self._error(
                f"{len(self._missing_segmentation)} GT annotation(s) have no 'segmentation' (first: annotations"
                f"[{first}]); mask AP needs one on every annotation"
            )
        if isinstance(results, str | Path):
            results_source = str(results)
            records = read_coco_json(results, "COCO results")
        else:
            results_source = "<results>"
            records = results
        detections = self._convert_results(records, iou_type, results_source, segm_area)

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
        self, records: Any, iou_type: str, source: str, segm_area: str = "mask"
    ) -> list[dict[str, Any]]:
        """Validate result records and build the engine's detections (what ``loadRes`` would build; docs/eval/coco.md).

        Per record: a non-empty ``bbox`` gives the detection box and, for ``"bbox"`` and for ``"segm"`` with
        ``segm_area="box"``, the area ``w * h``; otherwise (and for ``"segm"`` with ``segm_area="mask"``) the mask gives
        the area (and the box, if there is none). For ``"segm"`` with ``segm_area="box"``, a record with a box and no
        mask is evaluated with the rectangle polygon of its box, as ``loadRes`` builds it.
        """
        columns = validate_results(records, source, self.image_sizes, self.category_names)
        count = len(columns.scores)
        if count == 0:
            return []
        area_from_box = columns.has_box if iou_type == "bbox" or segm_area == "box" else np.zeros(count, bool)
        needs_mask = ~area_from_box | (columns.has_segmentation if iou_type == "segm" else False)
        missing = np.flatnonzero(needs_mask & ~columns.has_segmentation)
        if missing.size:
            raise COCOFormatError(
                self._missing_geometry_message(source, int(missing[0]), missing.size, count, iou_type, segm_area)
            )
        mask_rows = np.flatnonzero(needs_mask)
        rles = validate_result_masks(columns, mask_rows, self.image_sizes)
        rles = [rle if isinstance(rle["counts"], str | bytes) else to_compressed_rle(rle) for rle in rles]

        areas = np.zeros(count)
        boxes = columns.boxes.copy()
        areas[area_from_box] = boxes[area_from_box, 2] * boxes[area_from_box, 3]
        from_mask = ~area_from_box[mask_rows]
        if from_mask.any():
            # faster-coco-eval's batch calls: pycocotools' ``area`` overflows a uint8 counter beyond 255 RLEs.
            mask_rles = [rle for rle, use in zip(rles, from_mask, strict=True) if use]
            areas[mask_rows[from_mask]] = engine_mask.area(mask_rles).astype(np.float64)
            boxes[mask_rows[from_mask]] = engine_mask.toBbox(mask_rles).reshape(-1, 4)  # as for a popped box
        segmentations: list[Any] = [None] * count
        if iou_type == "segm":
            for row, rle in zip(mask_rows.tolist(), rles, strict=True):
                segmentations[row] = rle
            for row in np.flatnonzero(~columns.has_segmentation).tolist():  # segm_area="box", box only
                x, y, w, h = (columns.records[row]["bbox"][k] for k in range(4))
                segmentations[row] = [[x, y, x, y + h, x + w, y + h, x + w, y]]  # loadRes' rectangle polygon

        label = AGNOSTIC_CATEGORY["id"] if self.class_agnostic else None
        category_ids = columns.category_ids.tolist()
        detections = []
        for index, (image_id, score, box, area) in enumerate(
            zip(columns.image_ids.tolist(), columns.scores.tolist(), boxes.tolist(), areas.tolist(), strict=True)
        ):
            detection = {
                "id": index + 1,
                "image_id": image_id,
                "category_id": label if label is not None else category_ids[index],
                "score": score,
                "area": area,
                "iscrowd": 0,
                "bbox": box,
            }
            if iou_type == "segm":
                detection["segmentation"] = segmentations[index]
            detections.append(detection)
        return detections

    @staticmethod
    def _missing_geometry_message(
        source: str, first: int, missing: int, count: int, iou_type: str, segm_area: str
    ) -> str:
        """Error text for result records that lack what this ``iou_type`` / ``segm_area`` needs."""
        where = f"{source}: result {first}"
        if iou_type == "bbox":
            return (
                f"{where}: has neither a non-empty 'bbox' nor a 'segmentation' to take the box from ({missing} of "
                f"{count} results)"
            )
        if segm_area == "box":
            return f"{where}: has neither a 'segmentation' nor a non-empty 'bbox' ({missing} of {count} results)"
        return (
            f"{where}: lacks 'segmentation' ({missing} of {count} results have none); segm_area='mask' (detectron2) "
            f"evaluates masks only; segm_area='box' (pycocotools' loadRes, mmdet) evaluates a box-only record with the "
            f"rectangle mask of its box"
        )


def evaluate_coco(
    gt: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: IouType = "bbox",
    class_agnostic: bool = False,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    segm_area: SegmArea = "mask",
) -> dict[str, float]:
    """COCO AP / AR of ``results`` against ``gt``, identical to pycocotools' ``COCOeval``, several times faster.

    Args:
        gt: COCO instances JSON path or dict (not modified).
        results: Results JSON path (a list of records) or the list of result records (not modified).
        iou_type: ``"bbox"`` or ``"segm"``. For ``"segm"`` any ``bbox`` in the records is ignored.
        class_agnostic: Merge all categories into one before evaluating (no per-class keys then).
        max_dets: 3 increasing ints ending in 100.
        segm_area: ``"mask"`` (detectron2, default) or ``"box"`` (pycocotools ``loadRes`` as is, mmdet): where a segm
            detection's area for the size split comes from; see ``COCOGroundTruth.evaluate``.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (pycocotools' 12 stats in order; ``-1``
        where pycocotools reports it; all ``0.0`` for empty results), then ``AP/<category name>`` per category
        (``nan`` for a class without non-crowd GT). Fractions in ``[0, 1]``.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: For invalid GT or results; the message names the file and the problem.
    """
    ground_truth = COCOGroundTruth(gt, class_agnostic=class_agnostic)
    return ground_truth.evaluate(results, iou_type=iou_type, max_dets=max_dets, segm_area=segm_area).as_dict()


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
