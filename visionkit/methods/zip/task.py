"""``ZipTask``: Zip (or the SAM + CLIP baseline) as a LightningModule, driven by ``tools/eval.py``, evaluated on COCO.

Zip has no training: the task runs ``validate``, ``test`` and ``predict`` (``fit`` is refused with an error that says
so). Usage (``docs/methods/zip.md`` §10)::

    python tools/eval.py validate --config configs/zip/zip_coco_val2017.yaml --trainer.devices 4
    python tools/eval.py predict --config configs/zip/zip_coco_val2017.yaml --model.predictions_path out.json

Under Lightning's DDP every rank segments its shard of the images (``DistributedSampler``); the COCO evaluators gather
the records to rank 0 once, evaluate there and log the same numbers on every rank; ``predict`` gathers the records to
rank 0, which writes the results JSON (:class:`~visionkit.tasks.COCOEvaluationMixin`). Logged per stage: the 12 box
and mask stats class-aware (``val/bbox_AP``, ``val/segm_AP50``, ... and ``val/segm_AP/<class>``) and class-agnostic
(``val/agnostic/bbox_AP``, ``val/agnostic/segm_AP``, ...).

Data: ``COCODataModule`` (validate / test / predict; the vocabulary is the dataset's class names unless
``class_names`` is given) or :class:`~visionkit.data.ImageFolderInferenceDataModule` (predict;
``class_names`` needed, category ids ``1..C`` in vocabulary order). Zip segments the images as stored, so the data must
give them unresized: ``COCODataModule(stored_eval_images=True)`` (as the configs set it) gives ``uint8`` images at their
original size; a float image in ``[0, 1]`` at its original size is turned back into exactly its ``uint8`` pixels, and
an image whose size is not its ``orig_size`` (a resized one) is an error that says which setting to use. The images are
brought back to the CPU (Zip's preprocessing is PIL's); the models run on the task's device.

The records are built by :func:`~visionkit.methods.zip.inference.batch_records`, the function ``tools/zip_infer.py``
uses, and validation scores :func:`~visionkit.methods.zip.inference.segment_batch`'s output, which those records are
made of: the logged stats are those of the predicted records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from visionkit.methods.zip.inference import batch_records, segment_batch
from visionkit.methods.zip.segmenter import FOUNDATION_ARGS, ZipConfig, build_segmenter, load_foundation_models
from visionkit.tasks import BaseTask, COCOEvaluationMixin

__all__ = ["ZipTask"]

Batch = tuple[list[Tensor], list[dict[str, Any]]]
#: Dataset split each Lightning stage reads.
STAGE_TO_SPLIT: dict[str, str] = {"validate": "val", "test": "test", "predict": "predict"}
NO_TRAINING = (
    "ZipTask runs validate, test and predict (tools/eval.py); it has no training: Zip is training-free. To train a "
    "detector on Zip's pseudo-labels see configs/zip/self_train_round0.yaml."
)


def original_image(image: Tensor, target: dict[str, Any]) -> np.ndarray:
    """A batch image as Zip takes it: ``[H, W, 3]`` uint8 RGB at the original size, on the CPU.

    Args:
        image: ``(3, H, W)`` uint8, or float in ``[0, 1]`` (``ToFloat``'s output, converted back exactly).
        target: Its target; ``orig_size`` (when present) must equal ``(H, W)``.

    Returns:
        The pixels.

    Raises:
        ValueError: The image is resized, normalised or not RGB (the message names the image id).
    """
    where = f"image {target.get('image_id')!r}"
    if image.dtype != torch.uint8:
        if not image.is_floating_point() or (image.numel() > 0 and not 0 <= image.min() <= image.max() <= 1):
            raise ValueError(
                f"{where}: ZipTask needs uint8 images or floats in [0, 1], got {image.dtype} (a normalised image "
                "cannot be turned back into its pixels); remove the normalisation from the data pipeline"
            )
        image = (image.float() * 255).round().to(torch.uint8)  # exact inverse of ToFloat (x / 255 in float32)
    expected = target.get("orig_size")
    if image.ndim != 3 or image.shape[0] != 3 or (expected is not None and tuple(image.shape[1:]) != tuple(expected)):
        raise ValueError(
            f"{where}: ZipTask needs (3, H, W) images at their original size {expected}, got {tuple(image.shape)}; "
            "give the images without resizing (COCODataModule: stored_eval_images: true)"
        )
    return image.cpu().permute(1, 2, 0).numpy()


class ZipTask(COCOEvaluationMixin, BaseTask):
    """Zip (``method="zip"``) or SAM "everything" + CLIP (``method="baseline"``) over a datamodule's images.

    Args:
        clip_checkpoint: OpenAI CLIP ViT-B/16 weights (``weights/ViT-B-16.pt``, a TorchScript archive, or safetensors).
        sam_checkpoint: SAM weights (``weights/sam_vit_h_4b8939.pth``).
        boundary_checkpoint: OpenAI CLIP RN50x64 weights (``weights/RN50x64.pt``); needed for ``method="zip"``.
        method: ``"zip"`` or ``"baseline"``.
        clip_arch: open_clip architecture of ``clip_checkpoint`` (a name, or a config dict for tiny test models).
        boundary_arch: open_clip ResNet architecture of ``boundary_checkpoint``.
        sam_variant: SAM variant of ``sam_checkpoint`` (``vit_h``, ``vit_l``, ``vit_b``; ``vit_test`` for tests).
        class_names: The vocabulary; ``None``: the dataset's class names. With a COCO dataset every name must be one
            of its categories (evaluation needs their ids).
        encoder_batch_size: Images per SAM image-encoder pass (Zip).
        semantic_size: Side of the square CLIP Surgery input (released: 512).
        n_surgery: CLIP Surgery blocks (released: 6).
        norm_dim: Token normalisation axis of the feature surgery (released: 1).
        activation_ratio: Activation mask = map > ratio x mean(map) (released: 0.7).
        boundary_short_side: Short side of the clustering input in pixels (released: 2048).
        k: K-means clusters (released: 20).
        kmeans_iters: K-means iteration cap (released: 100).
        kmeans_rtol: K-means stopping tolerance (released: 1e-5).
        kmeans_init: ``"raster"`` (released) or ``"random"`` (seeded by ``seed``).
        seed: Seed of the random k-means initialisation.
        gain_thresh: Fragment activation fraction to keep (released: 0.3).
        compact_thresh: Fragment box area / area below which it is kept (released: 3).
        top_k_clusters: Clusters examined per class (released: 20).
        min_area: Smallest instance in cluster-grid cells (released: 100).
        classification_first: Gate the classes by CLIP's image-level probability.
        class_min_prob: Probability a class needs to count as present.
        max_classes: At most this many classes per image.
        classifier_size: CLIP input side for image-level and crop scores in pixels (224).
        nms_iou: Per-class mask NMS IoU threshold; ``None``: none (as released).
        class_agnostic: Label every instance with the first vocabulary entry.
        points_per_side: Baseline: SAM automatic generator's point grid side (SAM: 32).
        pred_iou_thresh: Baseline: minimum SAM predicted IoU (SAM: 0.88).
        stability_score_thresh: Baseline: minimum SAM stability score (SAM: 0.95).
        box_nms_thresh: Baseline: box NMS IoU between SAM masks (SAM: 0.7).
        coco_segm_area: Area of the segm size split: ``"mask"`` (detectron2) or ``"box"`` (pycocotools with boxes).
        predictions_path: Where ``predict`` writes the COCO results JSON; ``None``:
            ``<trainer.default_root_dir>/predictions.json``.
    """

    monitor: ClassVar[str] = "val/segm_AP"
    mode: ClassVar[str] = "max"
    #: Zip is training-free: ``fit`` is refused (``tests/test_configs.py`` runs ``validate`` for such tasks).
    trainable: ClassVar[bool] = False
    coco_evaluations: ClassVar[dict[str, bool]] = {"": False, "agnostic/": True}

    def __init__(
        self,
        clip_checkpoint: str,
        sam_checkpoint: str,
        boundary_checkpoint: str | None = None,
        method: Literal["zip", "baseline"] = "zip",
        clip_arch: str | dict[str, Any] = "ViT-B-16",
        boundary_arch: str | dict[str, Any] = "RN50x64",
        sam_variant: str = "vit_h",
        class_names: list[str] | None = None,
        encoder_batch_size: int = 1,
        semantic_size: int = 512,
        n_surgery: int = 6,
        norm_dim: int = 1,
        activation_ratio: float = 0.7,
        boundary_short_side: int = 2048,
        k: int = 20,
        kmeans_iters: int = 100,
        kmeans_rtol: float = 1e-5,
        kmeans_init: Literal["raster", "random"] = "raster",
        seed: int = 0,
        gain_thresh: float = 0.3,
        compact_thresh: float = 3.0,
        top_k_clusters: int = 20,
        min_area: int = 100,
        classification_first: bool = True,
        class_min_prob: float = 0.05,
        max_classes: int = 5,
        classifier_size: int = 224,
        nms_iou: float | None = None,
        class_agnostic: bool = False,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        coco_segm_area: Literal["mask", "box"] = "mask",
        predictions_path: str | None = None,
    ) -> None:
        super().__init__()

    def configure_models(self) -> None:
        """Load the CLIP / SAM checkpoints (fails early, naming a missing file); the vocabulary waits for ``setup``."""
        hp = self.hparams
        self.foundation = load_foundation_models(**{key: hp[key] for key in FOUNDATION_ARGS})
        self.zip_config = ZipConfig(**{f.name: hp[f.name] for f in fields(ZipConfig)})
        self.segmenter: torch.nn.Module | None = None
        self.category_ids: list[int] = []
        self.init_coco_evaluation()

    def setup(self, stage: str) -> None:
        """Fix the vocabulary from the stage's dataset and build the segmenter for it.

        Raises:
            RuntimeError: ``stage == "fit"``: Zip has no training.
        """
        if stage not in STAGE_TO_SPLIT:
            raise RuntimeError(f"{NO_TRAINING} (stage {stage!r})")
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = datamodule.dataset(STAGE_TO_SPLIT[stage]) if datamodule is not None else None
        names, self.category_ids = self._vocabulary(dataset)
        if self.segmenter is None or list(self.segmenter.class_names) != names:
            self.foundation.clip_model.to(self.device)  # the text ensemble is encoded on the task's device
            self.segmenter = build_segmenter(
                self.foundation,
                names,
                self.zip_config,
                encoder_batch_size=self.hparams.encoder_batch_size,
                automatic_masks={
                    key: self.hparams[key]
                    for key in ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")
                },
            )
            # SAM sits in the segmenter's prompter / generator, which are not modules: registered here, so that
            # Lightning moves it with the task (the CLIP models and the trunk are submodules of the segmenter)
            self.sam = self.foundation.sam

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Refused: Zip has no training (``setup("fit")`` already says so before any step).

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError(NO_TRAINING)

    def _vocabulary(self, dataset: Any) -> tuple[list[str], list[int]]:
        """The class names to segment and the COCO category id of each."""
        dataset_names = list(getattr(dataset, "class_names", None) or [])
        mapping = getattr(dataset, "contiguous_to_category_id", None)
        names = list(self.hparams.class_names or dataset_names)
        if not names:
            raise ValueError(
                f"ZipTask needs a vocabulary: set model.class_names, or use a dataset with class names (got "
                f"{type(dataset).__name__})"
            )
        if not (dataset_names and mapping):
            return names, list(range(1, len(names) + 1))
        unknown = [name for name in names if name not in dataset_names]
        if unknown:
            raise ValueError(
                f"class_names {unknown} are not categories of {getattr(dataset, 'ann_file', dataset)!r} "
                f"(its categories: {dataset_names})"
            )
        return names, [int(mapping[dataset_names.index(name)]) for name in names]

    def coco_category_ids(self, split: str) -> dict[int, int]:
        """Vocabulary index -> COCO category id (the dataset's ids for its names, else ``1..C``)."""
        return dict(enumerate(self.category_ids))

    def forward(self, images: Sequence[np.ndarray]) -> list[dict[str, Tensor]]:
        """Segment ``[H, W, 3]`` uint8 RGB images (see :func:`~visionkit.methods.zip.inference.segment_batch`)."""
        if self.segmenter is None:
            raise RuntimeError("ZipTask.setup has not run yet: the vocabulary is not known")
        return segment_batch(self.segmenter, images)

    def coco_batch_predictions(self, batch: Batch) -> tuple[list[dict[str, Tensor]], list[int]]:
        """Zip's instances of one batch at the original image sizes, and the images' ids."""
        images, targets = batch
        arrays = [original_image(image, target) for image, target in zip(images, targets, strict=True)]
        return self(arrays), [int(target["image_id"]) for target in targets]

    def coco_prediction_records(self, batch: Batch) -> list[tuple[int, list[dict[str, Any]]]]:
        """COCO result records of one batch, by :func:`~visionkit.methods.zip.inference.batch_records`."""
        images, targets = batch
        if self.segmenter is None:
            raise RuntimeError("ZipTask.setup has not run yet: the vocabulary is not known")
        arrays = [original_image(image, target) for image, target in zip(images, targets, strict=True)]
        image_ids = [int(target["image_id"]) for target in targets]
        return list(zip(image_ids, batch_records(self.segmenter, arrays, image_ids, self.category_ids), strict=True))
