"""Evaluation: COCO box / mask AP (faster-coco-eval engine, pycocotools-identical), mIoU / Dice, top-k accuracy.

Depends only on numpy, torch, pycocotools and faster-coco-eval; never on visionkit's data, models or tasks.
"""

from visionkit.eval.classification import ClassificationEvaluator, topk_accuracy
from visionkit.eval.coco import (
    COCO_ENGINE,
    COCO_STAT_NAMES,
    SEGM_AREAS,
    COCOEvalResult,
    COCOGroundTruth,
    evaluate_coco,
    format_coco_table,
    iou_type_label,
)
from visionkit.eval.coco_evaluator import COCOEvaluator
from visionkit.eval.coco_results import coco_result_records
from visionkit.eval.rle import decode_rle, encode_mask, encode_masks, rle_area, rle_to_bbox
from visionkit.eval.segmentation import SegmentationEvaluator

__all__ = [
    "COCO_ENGINE",
    "COCO_STAT_NAMES",
    "SEGM_AREAS",
    "COCOEvalResult",
    "COCOEvaluator",
    "COCOGroundTruth",
    "ClassificationEvaluator",
    "SegmentationEvaluator",
    "coco_result_records",
    "decode_rle",
    "encode_mask",
    "encode_masks",
    "evaluate_coco",
    "format_coco_table",
    "iou_type_label",
    "rle_area",
    "rle_to_bbox",
    "topk_accuracy",
]
