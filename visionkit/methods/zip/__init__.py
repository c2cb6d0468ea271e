"""Zip: annotation-free open-vocabulary instance segmentation (Shi & Yang, ICLR 2024, arXiv 2404.11957).

CLIP dense maps say what is where, K-means over CLIP-ResNet features gives object boundaries, the activated, compact
cluster fragments are grouped into instances and SAM turns their boxes into masks (``docs/methods/zip.md``: the method,
its constants and sources, and the commands). :class:`ZipTask` runs it through ``tools/eval.py`` (validate / test /
predict, DDP); ``tools/zip_infer.py`` runs it on one machine with resume. ``kmeans`` and ``connected_components`` live
in :mod:`visionkit.ops` and are re-exported here.
"""

from visionkit.methods.zip.discovery import discover_instances, grid_boxes_to_image, select_fragments
from visionkit.methods.zip.inference import (
    InferenceSummary,
    ResumeFileError,
    batch_records,
    coco_items,
    folder_items,
    run_inference,
    segment_batch,
)
from visionkit.methods.zip.postprocess import (
    mask_boxes,
    mask_iou,
    mask_nms,
    score_instances,
    select_present_classes,
)
from visionkit.methods.zip.pseudo_labels import AGNOSTIC_CATEGORY, results_to_training_set
from visionkit.methods.zip.segmenter import (
    FoundationModels,
    SamClipBaseline,
    ZipConfig,
    ZipSegmenter,
    build_segmenter,
    load_foundation_models,
)
from visionkit.methods.zip.task import ZipTask
from visionkit.ops.connected_components import connected_components, region_props
from visionkit.ops.kmeans import kmeans, raster_init_indices

__all__ = [
    "AGNOSTIC_CATEGORY",
    "FoundationModels",
    "InferenceSummary",
    "ResumeFileError",
    "SamClipBaseline",
    "ZipConfig",
    "ZipSegmenter",
    "ZipTask",
    "batch_records",
    "build_segmenter",
    "coco_items",
    "connected_components",
    "discover_instances",
    "folder_items",
    "grid_boxes_to_image",
    "kmeans",
    "load_foundation_models",
    "mask_boxes",
    "mask_iou",
    "mask_nms",
    "raster_init_indices",
    "region_props",
    "results_to_training_set",
    "run_inference",
    "score_instances",
    "segment_batch",
    "select_fragments",
    "select_present_classes",
]
