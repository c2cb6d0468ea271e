"""Zip: annotation-free open-vocabulary instance segmentation (Shi & Yang, ICLR 2024, arXiv 2404.11957).

CLIP dense maps say what is where, K-means over CLIP-ResNet features gives object boundaries, the activated, compact
cluster fragments are grouped into instances and SAM turns their boxes into masks (``shared/reference/zip.md``;
``docs/methods/zip.md``). ``kmeans`` and ``connected_components`` live in :mod:`visionkit.ops` and are re-exported here.
"""

from visionkit.methods.zip.discovery import discover_instances, grid_boxes_to_image, select_fragments
from visionkit.methods.zip.inference import InferenceSummary, coco_items, folder_items, run_inference
from visionkit.methods.zip.postprocess import (
    mask_iou,
    mask_nms,
    score_instances,
    select_present_classes,
)
from visionkit.methods.zip.pseudo_labels import AGNOSTIC_CATEGORY, results_to_training_set
from visionkit.methods.zip.segmenter import SamClipBaseline, ZipConfig, ZipSegmenter
from visionkit.ops.connected_components import connected_components, region_props
from visionkit.ops.kmeans import kmeans, raster_init_indices

__all__ = [
    "AGNOSTIC_CATEGORY",
    "InferenceSummary",
    "SamClipBaseline",
    "ZipConfig",
    "ZipSegmenter",
    "coco_items",
    "connected_components",
    "discover_instances",
    "folder_items",
    "grid_boxes_to_image",
    "kmeans",
    "mask_iou",
    "mask_nms",
    "raster_init_indices",
    "region_props",
    "results_to_training_set",
    "run_inference",
    "score_instances",
    "select_fragments",
    "select_present_classes",
]
