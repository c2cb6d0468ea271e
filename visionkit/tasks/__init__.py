"""Generic LightningModules that every method reuses for training, fine-tuning and probing."""

from visionkit.tasks.base import BaseTask
from visionkit.tasks.callbacks import AtomicCheckpointIO, ReseedEveryEpoch
from visionkit.tasks.classification import ClassificationTask
from visionkit.tasks.optim import build_adamw, param_groups_weight_decay, warmup_cosine_factor

__all__ = [
    "AtomicCheckpointIO",
    "BaseTask",
    "ClassificationTask",
    "ReseedEveryEpoch",
    "build_adamw",
    "param_groups_weight_decay",
    "warmup_cosine_factor",
]
