"""Generic LightningModules that every method reuses for training, fine-tuning and probing."""

from visionkit.tasks.backbone import resolve_backbone
from visionkit.tasks.base import BaseTask
from visionkit.tasks.callbacks import AtomicCheckpointIO, ReseedEveryEpoch
from visionkit.tasks.classification import ClassificationTask
from visionkit.tasks.coco_evaluation import COCOEvaluationMixin
from visionkit.tasks.instance_segmentation import InstanceSegmentationTask
from visionkit.tasks.optim import build_adamw, param_groups_weight_decay, warmup_cosine_factor
from visionkit.tasks.semantic_segmentation import SemanticSegmentationTask

__all__ = [
    "AtomicCheckpointIO",
    "BaseTask",
    "COCOEvaluationMixin",
    "ClassificationTask",
    "InstanceSegmentationTask",
    "ReseedEveryEpoch",
    "SemanticSegmentationTask",
    "build_adamw",
    "param_groups_weight_decay",
    "resolve_backbone",
    "warmup_cosine_factor",
]
