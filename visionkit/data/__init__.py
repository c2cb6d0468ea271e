"""Datasets in the real on-disk formats, joint transforms, collate functions and LightningDataModules.

* Readers: :func:`read_image`, :func:`read_label_map` (``image_io``).
* Datasets: :class:`COCODataset`, :class:`ADE20KDataset`, :class:`ImageFolderClassification`,
  :class:`UnlabeledImageFolder` (also multi-dataset pretraining collections, ``root/<dataset>/images``).
* Transforms (``transforms``) and their presets (``presets``): ``(image, target) -> (image, target)`` callables that
  keep boxes, instance masks and label maps consistent with the image.
* Multi-crop views for DINO / iBOT / OpenUS pretraining (``multicrop``: :class:`MultiCrop`,
  :func:`collate_multicrop`, :class:`MultiCropDataModule`).
* Collate functions (``collate``) and datamodules (``datamodule_base``, ``datamodules``, ``multicrop``, and
  ``unreadable`` for ``skip_unreadable``: the only modules here that import Lightning).
* Multi-task training (``multitask``: :class:`MultiTaskDataModule`): one child datamodule per task, batches
  ``{task: sub-batch}``, seeded per-task order, resumable mid-epoch, sharded per rank.
* EXIF frame decision (``image_io``: ``exif_orientation``) and the inference image folder (``NumberedImageFolder``).
* Synthetic writers (``synthetic``, ``synthetic_corpus``): tiny datasets in the same real formats, for tests and the
  quickstart.
"""

from visionkit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from visionkit.data.coco import COCODataset, COCOFormatError
from visionkit.data.collate import (
    collate_classification,
    collate_detection,
    collate_segmentation,
    collate_unlabeled,
)
from visionkit.data.datamodules import (
    ADE20KDataModule,
    BaseDataModule,
    COCODataModule,
    ImageFolderDataModule,
    ImageFolderInferenceDataModule,
    SeededRandomSampler,
    UnlabeledImageFolderDataModule,
)
from visionkit.data.holdout import HeldOutSplit, holdout_indices
from visionkit.data.image_folder import ImageFolderClassification, NumberedImageFolder, UnlabeledImageFolder
from visionkit.data.image_io import (
    IMAGE_EXTENSIONS,
    AnnotationSizeError,
    ExifOrientationMode,
    ImageReadError,
    read_exif_orientation,
    read_image,
    read_label_map,
)
from visionkit.data.multicrop import MultiCrop, MultiCropDataModule, collate_multicrop
from visionkit.data.multitask import MultiTaskDataModule
from visionkit.data.presets import classification_transforms, detection_transforms, segmentation_transforms
from visionkit.data.synthetic import (
    DEMO_KINDS,
    DEMO_SIZES,
    SHAPE_CATEGORIES,
    SHAPE_CLASS_NAMES,
    write_demo_data,
    write_shapes_ade20k,
    write_shapes_classification,
    write_shapes_coco,
)
from visionkit.data.synthetic_corpus import write_unlabeled_corpus
from visionkit.data.transforms import (
    CenterCrop,
    Compose,
    JointTransform,
    Normalize,
    PadToMultiple,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ResizeShortestSide,
    ToFloat,
)
from visionkit.data.unreadable import SkipUnreadable, UnreadableImagesReport
from visionkit.utils.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEMO_KINDS",
    "DEMO_SIZES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "SHAPE_CATEGORIES",
    "SHAPE_CLASS_NAMES",
    "ADE20KDataModule",
    "ADE20KDataset",
    "AnnotationSizeError",
    "BaseDataModule",
    "COCODataModule",
    "COCODataset",
    "COCOFormatError",
    "CenterCrop",
    "Compose",
    "ExifOrientationMode",
    "HeldOutSplit",
    "ImageFolderClassification",
    "ImageFolderDataModule",
    "ImageFolderInferenceDataModule",
    "ImageReadError",
    "JointTransform",
    "MultiCrop",
    "MultiCropDataModule",
    "MultiTaskDataModule",
    "Normalize",
    "NumberedImageFolder",
    "PadToMultiple",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ResizeShortestSide",
    "SeededRandomSampler",
    "SkipUnreadable",
    "ToFloat",
    "UnlabeledImageFolder",
    "UnlabeledImageFolderDataModule",
    "UnreadableImagesReport",
    "classification_transforms",
    "collate_classification",
    "collate_detection",
    "collate_multicrop",
    "collate_segmentation",
    "collate_unlabeled",
    "detection_transforms",
    "holdout_indices",
    "read_exif_orientation",
    "read_image",
    "read_label_map",
    "segmentation_transforms",
    "write_demo_data",
    "write_shapes_ade20k",
    "write_shapes_classification",
    "write_shapes_coco",
    "write_unlabeled_corpus",
]
