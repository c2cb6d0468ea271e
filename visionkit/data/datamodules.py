"""LightningDataModules for COCO, ADE20K, image folders (classification, unlabelled pretraining, inference).

Every ``__init__`` argument is a plain, typed value, so each datamodule can be configured from YAML through
``visionkit.cli`` (``data.class_path: COCODataModule`` plus ``init_args``), and the saved hyper-parameters keep
checkpoints loadable with ``torch.load(weights_only=True)``. Loader settings, seeded shuffling and ``generate_demo``
come from :class:`~visionkit.data.datamodule_base.BaseDataModule`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl

from visionkit.data.ade20k import ADE20KDataset
from visionkit.data.coco import COCODataset
from visionkit.data.collate import collate_classification, collate_detection, collate_segmentation, collate_unlabeled
from visionkit.data.datamodule_base import BaseDataModule, SeededRandomSampler
from visionkit.data.holdout import HeldOutSplit, holdout_indices
from visionkit.data.image_folder import ImageFolderClassification, NumberedImageFolder, UnlabeledImageFolder
from visionkit.data.image_io import ExifOrientationMode
from visionkit.data.presets import classification_transforms, detection_transforms, segmentation_transforms
from visionkit.utils.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20KDataModule",
    "BaseDataModule",
    "COCODataModule",
    "ImageFolderDataModule",
    "ImageFolderInferenceDataModule",
    "SeededRandomSampler",
    "UnlabeledImageFolderDataModule",
]


class COCODataModule(BaseDataModule):
    """COCO 2017 instance detection / segmentation (``COCODataset``; batches from ``collate_detection``).

    Transforms follow detectron2's COCO recipe (:func:`~visionkit.data.presets.detection_transforms`). Images are
    float32 in ``[0, 1]`` and not normalised unless ``normalize=True`` (torchvision's Mask R-CNN normalises
    internally). Paths are relative to ``data_root`` unless absolute. Without ``test_images``/``test_ann`` the test
    and predict stages use the val split. After ``setup``, ``class_names``, ``num_classes``,
    ``contiguous_to_category_id`` and ``ann_file`` (the ground truth that a COCO evaluator needs) are available.

    Args:
        data_root: Dataset root, e.g. ``data/coco``.
        train_images: Training image folder.
        train_ann: Training instances JSON.
        val_images: Validation image folder.
        val_ann: Validation instances JSON.
        test_images: Test image folder; ``None`` uses the val split.
        test_ann: Test instances JSON; ``None`` uses the val split.
        short_side: Evaluation (and default training) short side in pixels.
        max_size: Upper bound on the long side in pixels.
        train_short_sides: Training short sides sampled per image (multi-scale); ``None`` uses ``short_side``.
        flip_prob: Training horizontal-flip probability.
        filter_empty_train: Drop training images without usable annotations.
        with_masks: Load instance masks (``False`` for box-only detection).
        normalize: Standardise images with ``mean``/``std`` instead of returning ``[0, 1]`` floats.
        mean: Per-channel mean for ``normalize``.
        std: Per-channel standard deviation for ``normalize``.
        exif_orientation: Frame of images with an EXIF orientation tag: ``"auto"`` (stored pixels when their size
            matches the JSON's ``height``/``width``, else upright), ``"stored"`` or ``"upright"``
            (see :class:`~visionkit.data.coco.COCODataset`).
        stored_eval_images: The val / test / predict items are the images as stored: ``uint8`` ``(3, H, W)`` at the
            original size, no resize or normalisation (training-free methods such as Zip preprocess the pixels
            themselves); training is unaffected.
        **kwargs: Loader settings of :class:`BaseDataModule` (``batch_size``, ``num_workers``, ``seed``,
            ``skip_unreadable``, ...).
    """

    collate_fn = staticmethod(collate_detection)
    demo_kind: ClassVar[str | None] = "coco"

    def __init__(
        self,
        data_root: str,
        train_images: str = "train2017",
        train_ann: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_ann: str = "annotations/instances_val2017.json",
        test_images: str | None = None,
        test_ann: str | None = None,
        short_side: int = 800,
        max_size: int = 1333,
        train_short_sides: list[int] | None = None,
        flip_prob: float = 0.5,
        filter_empty_train: bool = True,
        with_masks: bool = True,
        normalize: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        exif_orientation: ExifOrientationMode = "auto",
        stored_eval_images: bool = False,
        **kwargs: Any,
    ) -> None:
        if (test_images is None) != (test_ann is None):
            raise ValueError(f"give both test_images and test_ann or neither, got {test_images!r} and {test_ann!r}")
        data_root = str(data_root)  # saved hyper-parameters must stay plain values (no Path) for weights-only loading
        super().__init__(**kwargs)
        root = Path(data_root)
        self.split_paths: dict[str, tuple[Path, Path]] = {
            "train": (root / train_images, root / train_ann),
            "val": (root / val_images, root / val_ann),
        }
        self.split_paths["test"] = (
            (root / test_images, root / test_ann) if test_images and test_ann else self.split_paths["val"]
        )
        self.split_paths["predict"] = self.split_paths["test"]

    def build_dataset(self, split: str) -> COCODataset:
        """Construct the ``COCODataset`` of ``split`` with its transforms."""
        hp = self.hparams
        train = split == "train"
        transforms = (
            None
            if not train and hp.stored_eval_images
            else detection_transforms(
                train,
                short_side=hp.short_side,
                max_size=hp.max_size,
                train_short_sides=hp.train_short_sides,
                flip_prob=hp.flip_prob,
                normalize=hp.normalize,
                mean=hp.mean,
                std=hp.std,
            )
        )
        images, ann_file = self.split_paths[split]
        return COCODataset(
            images,
            ann_file,
            transforms=transforms,
            with_masks=hp.with_masks,
            filter_empty=train and hp.filter_empty_train,
            exif_orientation=hp.exif_orientation,
        )

    def check_compatible(self, split: str, dataset: Any, other_split: str, other: Any) -> None:
        """Raise ``ValueError`` if two splits map contiguous labels to different category ids or names."""
        if dataset.contiguous_to_category_id != other.contiguous_to_category_id:
            raise ValueError(
                f"{type(self).__name__}: {dataset.ann_file} ({split}) and {other.ann_file} ({other_split}) have "
                f"different category ids: {dataset.contiguous_to_category_id} vs {other.contiguous_to_category_id}"
            )
        super().check_compatible(split, dataset, other_split, other)

    @property
    def contiguous_to_category_id(self) -> dict[int, int]:
        """Contiguous label → COCO category id (after :meth:`setup`)."""
        return dict(self._first_dataset().contiguous_to_category_id)

    @property
    def ann_file(self) -> Path:
        """Ground-truth JSON of the split being evaluated: val's if set up, else test's (or predict's)."""
        return self._first_dataset(("val", "test", "predict")).ann_file


def _ade20k_folder(data_root: Path) -> Path:
    """``data_root`` itself if it is the ``ADEChallengeData2016`` folder, else the one inside it."""
    nested = data_root / "ADEChallengeData2016"
    return nested if not (data_root / "images").is_dir() and nested.is_dir() else data_root


class ADE20KDataModule(BaseDataModule):
    """ADE20K semantic segmentation (``ADE20KDataset``; batches from ``collate_segmentation``).

    Transforms follow the mmseg / Mask2Former ADE20K recipe (:func:`~visionkit.data.presets.segmentation_transforms`):
    multi-scale resize, ``crop_size`` random crops with ``cat_max_ratio``, flip, normalisation; evaluation resizes the
    short side to ``short_side`` (label maps with nearest neighbour). Each batch is padded at the bottom/right to its
    largest image, rounded up to a multiple of ``size_divisor`` (image 0, label 255); its ``image_size`` entry keeps
    every sample's unpadded size. After ``setup``: ``class_names`` and ``num_classes`` (150, or 151 without
    ``reduce_zero_label``); ``ignore_index`` is 255.

    Splits: ADE20K has no public test labels. By default the val, test and predict stages all read the
    ``validation`` folder. With ``val_fraction > 0`` the val split is that share of the ``training`` folder, held out
    of training (:func:`holdout_indices`: the same images on every run, whatever the seed), and the ``validation``
    folder is the test (and predict) split only: a probe selects its epoch on val and reports test.

    Args:
        data_root: The ``ADEChallengeData2016`` folder or the folder that contains it.
        crop_size: Training crop side in pixels.
        short_side: Base short side in pixels (training scales it by ``scale_range``).
        max_size: Upper bound on the long side in pixels.
        scale_range: Range of the training short-side multiplier.
        cat_max_ratio: Largest share one class may take of a training crop (mmseg 0.75).
        flip_prob: Training horizontal-flip probability.
        reduce_zero_label: Map label 0 ("other") to 255 and k to k - 1 (mmseg convention).
        size_divisor: Pad batches to a multiple of this many pixels (a backbone's stride; 0 or 1 disables).
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        exif_orientation: Frame of images with an EXIF orientation tag: ``"auto"`` (stored pixels when their size
            matches the label map's, else upright), ``"stored"`` or ``"upright"``
            (see :class:`~visionkit.data.ade20k.ADE20KDataset`).
        val_fraction: Share of the training folder held out as the val split, in ``[0, 1)``; 0 validates on the
            ``validation`` folder (which is then also the test split).
        **kwargs: Loader settings of :class:`BaseDataModule` (``batch_size``, ``num_workers``, ``seed``,
            ``skip_unreadable``, ...).
    """

    ignore_index: ClassVar[int] = IGNORE_INDEX
    demo_kind: ClassVar[str | None] = "ade20k"

    def __init__(
        self,
        data_root: str,
        crop_size: int = 512,
        short_side: int = 512,
        max_size: int = 2048,
        scale_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        reduce_zero_label: bool = True,
        size_divisor: int = 32,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        exif_orientation: ExifOrientationMode = "auto",
        val_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        data_root = str(data_root)  # saved hyper-parameters must stay plain values (no Path) for weights-only loading
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        super().__init__(**kwargs)
        self.data_root = Path(data_root)
        # Padding to the stride happens per batch, so that the collated ``image_size`` is the unpadded size.
        self.collate_fn = functools.partial(collate_segmentation, size_divisor=max(size_divisor, 1))

    def build_dataset(self, split: str) -> ADE20KDataset | HeldOutSplit:
        """The dataset of ``split``: the ``training`` folder (or its kept / held-out part) or ``validation``."""
        hp = self.hparams
        transforms = segmentation_transforms(
            split == "train",
            crop_size=hp.crop_size,
            short_side=hp.short_side,
            max_size=hp.max_size,
            scale_range=hp.scale_range,
            cat_max_ratio=hp.cat_max_ratio,
            flip_prob=hp.flip_prob,
            ignore_index=IGNORE_INDEX,
            size_divisor=None,
            mean=hp.mean,
            std=hp.std,
        )
        held_out = hp.val_fraction > 0
        ade_split = "training" if split == "train" or (held_out and split == "val") else "validation"
        # Resolved here, not in __init__: with generate_demo the folder only exists after prepare_data.
        root = _ade20k_folder(self.data_root)
        dataset = ADE20KDataset(
            root,
            ade_split,
            transforms=transforms,
            reduce_zero_label=hp.reduce_zero_label,
            exif_orientation=hp.exif_orientation,
        )
        if not held_out or ade_split != "training":
            return dataset
        kept, held = holdout_indices(len(dataset), hp.val_fraction)
        return HeldOutSplit(dataset, held if split == "val" else kept)


class ImageFolderDataModule(BaseDataModule):
    """Image-folder classification, ``data_root/<split>/<class>/<image>`` (batches from ``collate_classification``).

    Transforms follow the timm / torchvision ImageNet recipe
    (:func:`~visionkit.data.presets.classification_transforms`). Every split uses the training split's class list
    (its sorted folder names, or ``class_names``), so a class folder missing from one split cannot shift the labels.

    Splits: the test and predict stages read ``test_split``, or ``val_split`` when it is ``None``. With
    ``val_fraction > 0`` the val split is that share of every class of ``train_split``, held out of training
    (:func:`holdout_indices`: the same images on every run), for datasets that ship only train and test folders;
    ``val_split`` is then not read unless it is the test split.

    Args:
        data_root: Folder holding the split folders.
        image_size: Output side length in pixels.
        train_split: Training split folder name.
        val_split: Validation split folder name.
        test_split: Test split folder name; ``None`` uses ``val_split``.
        class_names: Fixed class list (folder names); ``None`` takes the training split's folders.
        crop_pct: Evaluation centre-crop fraction (resize to ``image_size / crop_pct``, then crop).
        scale: Training ``RandomResizedCrop`` area range.
        flip_prob: Training horizontal-flip probability.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        val_fraction: Share of each training class held out as the val split, in ``[0, 1)``; 0 reads ``val_split``.
        **kwargs: Loader settings of :class:`BaseDataModule` (``batch_size``, ``num_workers``, ``seed``,
            ``skip_unreadable``, ...).
    """

    collate_fn = staticmethod(collate_classification)
    demo_kind: ClassVar[str | None] = "classification"

    def __init__(
        self,
        data_root: str,
        image_size: int = 224,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        class_names: list[str] | None = None,
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        flip_prob: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        val_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        data_root = str(data_root)  # saved hyper-parameters must stay plain values (no Path) for weights-only loading
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        super().__init__(**kwargs)
        self.root = Path(data_root)
        test = test_split or val_split
        val = train_split if val_fraction > 0 else val_split
        self.split_folders = {"train": train_split, "val": val, "test": test, "predict": test}

    def _reference_class_names(self) -> list[str] | None:
        if self.hparams.class_names is not None:
            return list(self.hparams.class_names)
        if "train" in self.datasets:
            return list(self.datasets["train"].class_names)
        train_dir = self.root / self.split_folders["train"]
        if not train_dir.is_dir():
            return None
        # The dataset's own rule: sorted sub-folder names, hidden ones skipped.
        return sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def build_dataset(self, split: str) -> ImageFolderClassification | HeldOutSplit:
        """The ``ImageFolderClassification`` of ``split`` (or its part) with the training split's classes."""
        hp = self.hparams
        transforms = classification_transforms(
            split == "train",
            image_size=hp.image_size,
            crop_pct=hp.crop_pct,
            scale=hp.scale,
            flip_prob=hp.flip_prob,
            mean=hp.mean,
            std=hp.std,
        )
        dataset = ImageFolderClassification(
            self.root, self.split_folders[split], transforms=transforms, class_names=self._reference_class_names()
        )
        if hp.val_fraction == 0 or split not in ("train", "val"):
            return dataset
        kept, held = holdout_indices(len(dataset), hp.val_fraction, groups=dataset.targets)
        return HeldOutSplit(dataset, held if split == "val" else kept)


class UnlabeledImageFolderDataModule(BaseDataModule):
    """Every image under ``data_root`` (recursive), for self-supervised pretraining; training only.

    Batches come from ``collate_unlabeled``: ``(images (B, 3, S, S), {"image_id": [...], "path": [...]})`` with
    ``RandomResizedCrop(image_size, scale)``, flip and normalisation. There is no val/test/predict loader (the
    Trainer then skips validation). With ``image_subdir`` only ``data_root/<dataset>/<image_subdir>/**`` is read
    (a multi-dataset collection; targets add ``dataset``), see
    :class:`~visionkit.data.image_folder.UnlabeledImageFolder`.
    For multi-crop views (DINO / iBOT / OpenUS) use :class:`~visionkit.data.multicrop.MultiCropDataModule`.

    Args:
        data_root: Folder to walk.
        image_size: Output side length in pixels.
        scale: ``RandomResizedCrop`` area range (MAE pretraining uses (0.2, 1.0)).
        flip_prob: Horizontal-flip probability.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        image_subdir: Image folder inside each dataset folder of ``data_root``; ``None`` walks all of it.
        skip_incomplete: With ``image_subdir``, skip (with a warning) dataset folders that give no images.
        **kwargs: Loader settings of :class:`BaseDataModule` (``batch_size``, ``num_workers``, ``seed``,
            ``skip_unreadable``, ...).
    """

    collate_fn = staticmethod(collate_unlabeled)
    stage_splits: ClassVar[dict[str, tuple[str, ...]]] = {"fit": ("train",)}
    # Left as Lightning's own hooks: Lightning checks whether they are overridden to decide that there is no
    # validation / test / predict data.
    val_dataloader = pl.LightningDataModule.val_dataloader
    test_dataloader = pl.LightningDataModule.test_dataloader
    predict_dataloader = pl.LightningDataModule.predict_dataloader

    def __init__(
        self,
        data_root: str,
        image_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        flip_prob: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        image_subdir: str | None = None,
        skip_incomplete: bool = False,
        **kwargs: Any,
    ) -> None:
        data_root = str(data_root)  # saved hyper-parameters must stay plain values (no Path) for weights-only loading
        super().__init__(**kwargs)
        self.root = Path(data_root)

    def build_dataset(self, split: str) -> UnlabeledImageFolder:
        """Construct the ``UnlabeledImageFolder`` (only ``train`` exists)."""
        hp = self.hparams
        transforms = classification_transforms(
            True, image_size=hp.image_size, scale=hp.scale, flip_prob=hp.flip_prob, mean=hp.mean, std=hp.std
        )
        return UnlabeledImageFolder(
            self.root, transforms=transforms, image_subdir=hp.image_subdir, skip_incomplete=hp.skip_incomplete
        )


class ImageFolderInferenceDataModule(BaseDataModule):
    """Every image under ``data_root`` as stored, numbered ``1..N``, for ``predict`` of a method that needs no labels.

    Items are :class:`~visionkit.data.image_folder.NumberedImageFolder`'s: ``uint8`` ``(3, H, W)`` at the original size
    (no resize, no normalisation), batched as lists by ``collate_detection`` (sizes may differ), with targets
    ``{"image_id", "path", "orig_size"}``; image ``k`` (0-based, in ``UnlabeledImageFolder``'s sorted recursive order)
    has id ``k + 1``, so its records are valid COCO results (ids >= 1). Only the ``predict`` stage exists: there is no
    ground truth to validate against.

    Args:
        data_root: Folder to walk (recursively).
        **kwargs: Loader settings of :class:`~visionkit.data.BaseDataModule` (``batch_size``, ``val_batch_size``,
            ``num_workers``, ...); the predict loader uses ``val_batch_size`` (default ``batch_size``).
    """

    collate_fn = staticmethod(collate_detection)
    stage_splits: ClassVar[dict[str, tuple[str, ...]]] = {"predict": ("predict",)}
    # Lightning's own hooks: Lightning checks whether they are overridden to decide that there is no such data.
    train_dataloader = pl.LightningDataModule.train_dataloader
    val_dataloader = pl.LightningDataModule.val_dataloader
    test_dataloader = pl.LightningDataModule.test_dataloader

    def __init__(self, data_root: str, **kwargs: Any) -> None:
        data_root = str(data_root)  # saved hyper-parameters stay plain values
        super().__init__(**kwargs)
        self.root = Path(data_root)

    def build_dataset(self, split: str) -> NumberedImageFolder:
        """The folder's images (only ``predict`` exists)."""
        return NumberedImageFolder(self.root)
