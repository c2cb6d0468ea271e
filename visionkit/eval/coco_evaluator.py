"""Streaming COCO evaluator: model outputs in, COCO result records kept, box / mask AP out (DDP-aware).

``update`` turns per-image predictions (xyxy boxes in original image pixels, contiguous labels, optional masks at
original image size) into COCO result records; ``compute`` evaluates the images seen so far with the faster-coco-eval
engine (see ``visionkit.eval.coco``). Under ``torch.distributed`` the records are gathered to rank 0, evaluated there
only, and the metrics are broadcast so every rank returns the same dict.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from visionkit.eval.coco import COCO_ENGINE, IOU_TYPES, COCOGroundTruth, SegmArea, check_segm_area, iou_type_label
from visionkit.eval.coco_results import coco_result_records
from visionkit.utils import gather_to_rank0, run_on_rank0, write_json_atomic

__all__ = ["COCOEvaluator"]

# Probability masks are binarised like torchvision's detection reference (``references/detection``: masks > 0.5).
MASK_THRESHOLD = 0.5


class COCOEvaluator:
    """Accumulates detections / instance masks over a validation run and computes COCO AP.

    Args:
        gt: COCO instances JSON path, dict, or an already built ``COCOGroundTruth`` (reused as is; its
            ``class_agnostic`` setting wins).
        iou_types: Which of ``"bbox"`` and ``"segm"`` to evaluate. ``"segm"`` needs ``masks`` in every prediction.
        contiguous_to_category_id: Contiguous label → dataset category id (``COCODataset.contiguous_to_category_id``).
            ``None`` means the GT category ids in sorted order (label ``i`` is the ``i``-th smallest id).
        class_agnostic: Merge all categories into one before evaluating.
        segm_area: Which area the ``"segm"`` size split (APs/APm/APl, ARs/ARm/ARl) uses: ``"mask"`` (detectron2,
            default) or ``"box"`` (the record's box ``w * h``, as pycocotools' ``loadRes`` and mmdet do). See
            ``visionkit.eval.evaluate_coco`` and ``docs/eval/coco.md``.

    Attributes:
        engine: The COCO engine and its version (``COCO_ENGINE``), for logging next to the metrics.
        segm_area: The segm area convention in use; ``table_title(iou_type)`` names it for printed tables.

    Under DDP, images repeated across ranks (``DistributedSampler`` pads the last batch with repeats) are evaluated
    once, keeping the first rank's predictions, with a warning giving the count.
    """

    def __init__(
        self,
        gt: str | Path | Mapping[str, Any] | COCOGroundTruth,
        iou_types: Sequence[str] = ("bbox", "segm"),
        contiguous_to_category_id: Mapping[int, int] | None = None,
        class_agnostic: bool = False,
        segm_area: SegmArea = "mask",
    ) -> None:
        self.engine = COCO_ENGINE
        self.segm_area: SegmArea = check_segm_area(segm_area)  # type: ignore[assignment]
        self.iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
        if (
            not self.iou_types
            or len(set(self.iou_types)) != len(self.iou_types)
            or not set(self.iou_types) <= set(IOU_TYPES)
        ):
            raise ValueError(f"iou_types must be distinct values from {IOU_TYPES}, got {iou_types!r}")
        self.ground_truth = gt if isinstance(gt, COCOGroundTruth) else COCOGroundTruth(gt, class_agnostic)
        if contiguous_to_category_id is None:
            contiguous_to_category_id = dict(enumerate(self.ground_truth.category_ids))
        unknown = set(contiguous_to_category_id.values()) - set(self.ground_truth.category_ids)
        if unknown:
            raise ValueError(
                f"contiguous_to_category_id maps to category ids not in {self.ground_truth.source}: {sorted(unknown)}"
            )
        self.contiguous_to_category_id = {int(k): int(v) for k, v in contiguous_to_category_id.items()}
        self._label_lookup = torch.full((max(self.contiguous_to_category_id, default=-1) + 1,), -1, dtype=torch.long)
        for label, category_id in self.contiguous_to_category_id.items():
            if label < 0:
                raise ValueError(f"contiguous labels must be >= 0, got {label}")
            self._label_lookup[label] = category_id
        self._records_by_image: dict[int, list[dict[str, Any]]] = {}
        self._duplicate_images = 0

    def table_title(self, iou_type: str) -> str:
        """Label of one evaluation for printed tables: ``"bbox"``, ``"segm (mask area)"`` or ``"segm (box area)"``.

        Args:
            iou_type: ``"bbox"`` or ``"segm"``.

        Returns:
            The label (``visionkit.eval.coco.iou_type_label`` with this evaluator's ``segm_area``).
        """
        return iou_type_label(iou_type, self.segm_area)

    def reset(self) -> None:
        """Forget every record (call at the start of each validation epoch)."""
        self._records_by_image = {}
        self._duplicate_images = 0

    @property
    def records(self) -> list[dict[str, Any]]:
        """COCO result records of this process, in ``update`` order."""
        return [record for records in self._records_by_image.values() for record in records]

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images passed to ``update`` on this process, in order."""
        return list(self._records_by_image)

    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int]) -> None:
        """Convert one batch of predictions to COCO result records and keep them.

        Args:
            predictions: One dict per image with ``boxes`` ``(K, 4)`` float xyxy in **original image pixels**,
                ``scores`` ``(K,)`` float, ``labels`` ``(K,)`` int64 contiguous, and (needed for ``"segm"``) ``masks``
                ``(K, H, W)`` bool, or float probabilities binarised at ``> 0.5``, at the original image size.
            image_ids: The COCO image id of each prediction (python ints or 0-d tensors).

        Raises:
            ValueError: On a length mismatch, unknown image id, wrong shapes, unknown labels, negative box sizes or
                masks whose size differs from the GT image.
        """
        if len(predictions) != len(image_ids):
            raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
        for prediction, raw_image_id in zip(predictions, image_ids, strict=True):
            image_id = int(raw_image_id)
            if image_id not in self.ground_truth.image_sizes:
                raise ValueError(f"image id {image_id} is not in the ground truth {self.ground_truth.source}")
            records = self._to_records(prediction, image_id)
            if image_id in self._records_by_image:
                self._duplicate_images += 1
                continue
            self._records_by_image[image_id] = records

    def _to_records(self, prediction: Mapping[str, torch.Tensor], image_id: int) -> list[dict[str, Any]]:
        """COCO result records of one image's prediction."""
        missing = [key for key in ("boxes", "scores", "labels") if key not in prediction]
        if missing:
            raise ValueError(f"prediction for image {image_id} lacks {missing}")
        boxes = torch.as_tensor(prediction["boxes"]).detach().to("cpu", torch.float64)
        scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64)
        labels = torch.as_tensor(prediction["labels"]).detach().to("cpu", torch.long)
        count = boxes.shape[0] if boxes.ndim == 2 else -1
        if boxes.shape != (count, 4) or scores.shape != (count,) or labels.shape != (count,):
            raise ValueError(
                f"prediction for image {image_id}: expected boxes (K, 4), scores (K,), labels (K,), got "
                f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
            )
        if count == 0:
            return []
        known = (labels >= 0) & (labels < self._label_lookup.numel())
        category_ids = torch.full_like(labels, -1)
        category_ids[known] = self._label_lookup[labels[known]]
        known &= category_ids >= 0
        if not bool(known.all()):
            raise ValueError(
                f"prediction for image {image_id}: labels {sorted(set(labels[~known].tolist()))} are not in "
                f"contiguous_to_category_id"
            )
        masks = self._binary_masks(prediction, image_id, count) if "segm" in self.iou_types else None
        return coco_result_records(image_id, scores, category_ids, boxes=boxes, masks=masks)

    def _binary_masks(self, prediction: Mapping[str, torch.Tensor], image_id: int, count: int) -> torch.Tensor:
        """One image's masks as bool ``(K, H, W)`` on the CPU, after checking them against the GT image size."""
        if "masks" not in prediction:
            raise ValueError(f"prediction for image {image_id} lacks 'masks', needed for iou_type 'segm'")
        masks = torch.as_tensor(prediction["masks"]).detach()
        if masks.ndim == 4 and masks.shape[1] == 1:  # (K, 1, H, W), as Mask R-CNN heads return them
            masks = masks[:, 0]
        height, width = self.ground_truth.image_sizes[image_id]
        if masks.shape != (count, height, width):
            raise ValueError(
                f"prediction for image {image_id}: masks must be (K, H, W) = ({count}, {height}, {width}) at the "
                f"original image size, got {tuple(masks.shape)}"
            )
        if masks.dtype != torch.bool:
            masks = masks > MASK_THRESHOLD
        return masks.cpu()

    def compute(self) -> dict[str, float]:
        """Evaluate the images seen by ``update`` (on every rank, under DDP) and return the metrics.

        Returns:
            ``<iou type>_<stat>`` for the 12 COCO stats (e.g. ``bbox_AP``, ``segm_AP50``) and
            ``<iou type>_AP/<category name>`` per class; conventions as in ``visionkit.eval.evaluate_coco``.
            The same dict on every rank.
        """
        gathered = gather_to_rank0((list(self._records_by_image.items()), self._duplicate_images))

        def evaluate_on_rank0() -> dict[str, float]:
            assert gathered is not None
            return self._evaluate([items for items, _ in gathered], sum(count for _, count in gathered))

        return run_on_rank0(evaluate_on_rank0)

    def _evaluate(self, per_rank_items: list[list[tuple[int, list[dict[str, Any]]]]], duplicates: int) -> dict:
        """Merge per-rank records (first occurrence of an image wins) and run every iou type."""
        merged: dict[int, list[dict[str, Any]]] = {}
        for items in per_rank_items:
            for image_id, records in items:
                if image_id in merged:
                    duplicates += 1
                else:
                    merged[image_id] = records
        if duplicates:
            warnings.warn(
                f"COCOEvaluator: {duplicates} repeated image(s) (e.g. DistributedSampler padding) were evaluated "
                f"once, with their first predictions",
                stacklevel=3,
            )
        if not merged:
            warnings.warn("COCOEvaluator.compute() called before any update(); all stats are 0.0", stacklevel=3)
        records = [record for image_records in merged.values() for record in image_records]
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            result = self.ground_truth.evaluate(
                records, iou_type=iou_type, image_ids=list(merged), segm_area=self.segm_area
            )
            metrics.update({f"{iou_type}_{name}": value for name, value in result.as_dict().items()})
        return metrics

    def write_results(self, path: str | Path) -> Path:
        """Write this process's records as a COCO results JSON, atomically (:func:`visionkit.utils.write_json_atomic`).

        Args:
            path: Destination file; parent directories are created.

        Returns:
            The written path.
        """
        return write_json_atomic(self.records, path)
