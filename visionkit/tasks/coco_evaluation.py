"""COCO evaluation and COCO results JSON for every task that predicts instances: one mixin, shared by all of them.

A task that predicts instances (boxes, scores, contiguous labels, masks at the original image size) mixes in
:class:`COCOEvaluationMixin` before :class:`~visionkit.tasks.BaseTask` and implements
:meth:`~COCOEvaluationMixin.coco_batch_predictions`; the mixin supplies Lightning's validation, test and predict
hooks:

- ``validate`` / ``test``: one :class:`~visionkit.eval.COCOEvaluator` per stage and per entry of
  :attr:`~COCOEvaluationMixin.coco_evaluations` (class-aware, optionally class-agnostic), built from the stage's dataset
  (``ann_file`` + ``contiguous_to_category_id``, as on :class:`~visionkit.data.COCODataset`) once and reset every
  epoch; updated with each batch; at the epoch end it is computed (records gathered to rank 0 and evaluated there, the
  numbers broadcast), the 12 stats of each IoU type and the per-class APs are logged as ``<stage>/<infix><iou
  type>_<stat>`` (``val/bbox_AP``, ``val/segm_AP50``, ``val/agnostic/segm_AP``, ``val/segm_AP/<class>``) and rank 0
  prints the tables, whose titles name the segm area convention (``coco_segm_area``);
- ``predict``: COCO result records per image (:func:`~visionkit.eval.coco_result_records`), gathered to rank 0 once at
  the end (an image repeated by ``DistributedSampler``'s padding is kept once) and written atomically to
  ``predictions_path`` (default ``<trainer.default_root_dir>/predictions.json``): the file ``tools/eval.py coco
  --results`` reads.

The host's hyper-parameters must include ``coco_segm_area`` (``"mask"`` or ``"box"``) and ``predictions_path``, and
its ``configure_models`` calls :meth:`~COCOEvaluationMixin.init_coco_evaluation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from visionkit.eval import COCOEvaluator, coco_result_records, format_coco_table
from visionkit.utils import gather_to_rank0, write_json_atomic

__all__ = ["STAGE_SPLITS", "COCOEvaluationMixin", "Instances"]

#: One image's predictions: ``boxes`` (K, 4) xyxy original-image pixels, ``scores`` (K,), ``labels`` (K,) contiguous,
#: ``masks`` (K, H, W) bool at the original image size.
Instances = dict[str, Tensor]
#: Split whose ground truth each evaluation stage reads from the datamodule.
STAGE_SPLITS: dict[str, str] = {"val": "val", "test": "test"}


class COCOEvaluationMixin(pl.LightningModule):
    """Validation / test COCO evaluation and the predict COCO results JSON of an instance-prediction task.

    See the module docstring. Mixed in before ``BaseTask``: ``class MyTask(COCOEvaluationMixin, BaseTask)``.
    """

    #: The evaluations run per stage: metric-name infix -> ``class_agnostic``. ``{"": False}`` logs ``val/segm_AP``
    #: and friends; adding ``"agnostic/": True`` also logs ``val/agnostic/segm_AP`` (all classes merged into one).
    coco_evaluations: ClassVar[dict[str, bool]] = {"": False}

    def init_coco_evaluation(self) -> None:
        """Create the evaluation state (call once from ``configure_models``)."""
        self.coco_evaluators: dict[str, dict[str, COCOEvaluator]] = {}
        self._coco_evaluator_keys: dict[str, tuple[Any, ...]] = {}
        self._coco_predictions: dict[int, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------------------------------------------------
    # What the host provides
    # ------------------------------------------------------------------------------------------------------------

    def coco_batch_predictions(self, batch: Any) -> tuple[list[Instances], list[int]]:
        """One batch's predictions at the original image size and the COCO image id of each image.

        Args:
            batch: What the stage's dataloader yields.

        Returns:
            ``(predictions, image_ids)``: one :data:`Instances` dict per image, and the images' COCO ids.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement coco_batch_predictions")

    def coco_category_ids(self, split: str) -> Mapping[int, int] | None:
        """Contiguous label -> COCO category id for the dataset of ``split``; ``None`` when the dataset has none.

        Args:
            split: ``"val"``, ``"test"`` or ``"predict"``.

        Returns:
            The dataset's ``contiguous_to_category_id`` (override to map labels differently).
        """
        return getattr(self.coco_dataset(split), "contiguous_to_category_id", None)

    # ------------------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------------------

    def coco_dataset(self, split: str) -> Any:
        """The dataset of ``split``: from the datamodule, else from the stage's dataloader.

        Args:
            split: ``"val"``, ``"test"`` or ``"predict"``.

        Returns:
            The dataset object (``None`` when neither source has one).
        """
        datamodule = self.task_datamodule()
        if datamodule is not None and hasattr(datamodule, "dataset"):
            return datamodule.dataset(split)
        loaders = {
            "val": self.trainer.val_dataloaders,
            "test": self.trainer.test_dataloaders,
            "predict": self.trainer.predict_dataloaders,
        }[split]
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(loader, "dataset", None)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------

    def start_coco_evaluation(self, stage: str) -> None:
        """Build (once per ground truth and label map) or reset the evaluators of ``stage``.

        Args:
            stage: ``"val"`` or ``"test"``.

        Raises:
            ValueError: The stage's dataset has no COCO ground truth (``ann_file``).
        """
        split = STAGE_SPLITS[stage]
        dataset = self.coco_dataset(split)
        ann_file = getattr(dataset, "ann_file", None)
        category_ids = self.coco_category_ids(split) if ann_file is not None else None
        if ann_file is None or category_ids is None:
            raise ValueError(
                f"{type(self).__name__} needs the {stage} dataset's COCO ground truth (`ann_file` and "
                f"`contiguous_to_category_id`, as on visionkit.data.COCODataset); got {type(dataset).__name__}"
            )
        segm_area = self.hparams.coco_segm_area
        key = (Path(ann_file), tuple(sorted(category_ids.items())), segm_area)
        if self._coco_evaluator_keys.get(stage) != key:
            self.coco_evaluators[stage] = {
                infix: COCOEvaluator(
                    ann_file,
                    iou_types=("bbox", "segm"),
                    contiguous_to_category_id=category_ids,
                    class_agnostic=agnostic,
                    segm_area=segm_area,
                )
                for infix, agnostic in self.coco_evaluations.items()
            }
            self._coco_evaluator_keys[stage] = key
        for evaluator in self.coco_evaluators[stage].values():
            evaluator.reset()

    def coco_evaluation_step(self, batch: Any, stage: str) -> list[Instances]:
        """Predict one batch and hand it to the evaluators of ``stage``.

        Args:
            batch: What the stage's dataloader yields.
            stage: ``"val"`` or ``"test"``.

        Returns:
            The batch's predictions (for subclasses that also draw them).
        """
        predictions, image_ids = self.coco_batch_predictions(batch)
        for evaluator in self.coco_evaluators[stage].values():
            evaluator.update(predictions, image_ids)
        return predictions

    def end_coco_evaluation(self, stage: str) -> dict[str, float] | None:
        """Compute, log and print (rank 0) the COCO metrics of ``stage``; nothing during Lightning's sanity check.

        Args:
            stage: ``"val"`` or ``"test"``.

        Returns:
            The logged metrics by name (the same on every rank), or ``None`` during the sanity check.
        """
        if self.trainer.sanity_checking:
            return None
        logged: dict[str, float] = {}
        for infix, evaluator in self.coco_evaluators[stage].items():
            metrics = evaluator.compute()  # evaluated on rank 0, the same dict on every rank
            logged.update({f"{stage}/{infix}{name}": value for name, value in metrics.items()})
            mode = "class-agnostic " if evaluator.ground_truth.class_agnostic else ""
            when = f"(epoch {self.current_epoch}, {evaluator.engine})"
            for iou_type in evaluator.iou_types:
                title = f"{stage} {mode}{evaluator.table_title(iou_type)} {when}"
                rank_zero_info(format_coco_table(metrics, title=title, prefix=f"{iou_type}_"))
        self.log_dict(logged, sync_dist=False)
        return logged

    def on_validation_epoch_start(self) -> None:
        """Build (once) or reset the validation COCO evaluators."""
        self.start_coco_evaluation("val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Predict one batch at original image size and hand it to the evaluators."""
        self.coco_evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log the COCO metrics and print the tables."""
        self.end_coco_evaluation("val")

    def on_test_epoch_start(self) -> None:
        """Build (once) or reset the test COCO evaluators."""
        self.start_coco_evaluation("test")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Predict one batch at original image size and hand it to the evaluators."""
        self.coco_evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Log the COCO metrics and print the tables."""
        self.end_coco_evaluation("test")

    # ------------------------------------------------------------------------------------------------------------
    # Prediction
    # ------------------------------------------------------------------------------------------------------------

    def coco_prediction_records(self, batch: Any) -> list[tuple[int, list[dict[str, Any]]]]:
        """COCO result records of one predict batch, per image (override to build them another way).

        Args:
            batch: What the predict dataloader yields.

        Returns:
            ``(image_id, records)`` per image, in batch order.
        """
        predictions, image_ids = self.coco_batch_predictions(batch)
        category_id = self._category_lookup()
        return [
            (
                image_id,
                coco_result_records(
                    image_id,
                    prediction["scores"],
                    [category_id(label) for label in prediction["labels"].tolist()],
                    boxes=prediction["boxes"],
                    masks=prediction.get("masks"),
                ),
            )
            for image_id, prediction in zip(image_ids, predictions, strict=True)
        ]

    def _category_lookup(self) -> Callable[[int], int]:
        mapping = self.coco_category_ids("predict")
        if mapping is None:
            warnings.warn(
                "the predict dataset has no contiguous_to_category_id; writing category_id = label + 1",
                stacklevel=3,
            )
            return lambda label: int(label) + 1
        return lambda label: int(mapping[int(label)])

    def on_predict_epoch_start(self) -> None:
        """Forget the records of an earlier ``predict`` run."""
        self._coco_predictions = {}

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        """COCO result records (``image_id``, ``category_id``, ``bbox`` xywh, ``score``, ``segmentation`` RLE)."""
        records: list[dict[str, Any]] = []
        for image_id, image_records in self.coco_prediction_records(batch):
            self._coco_predictions.setdefault(int(image_id), image_records)
            records += image_records
        return records

    def on_predict_epoch_end(self) -> None:
        """Write every process's records (gathered to rank 0, each image once) to :meth:`predictions_file`."""
        gathered = gather_to_rank0(list(self._coco_predictions.items()))
        if gathered is None:
            return
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in gathered:
            for image_id, image_records in part:
                merged.setdefault(image_id, image_records)
        records = [record for image_records in merged.values() for record in image_records]
        path = write_json_atomic(records, self.predictions_file())
        rank_zero_info(f"{len(records)} COCO result records of {len(merged)} images written to {path}")

    def predictions_file(self) -> Path:
        """Where ``predict`` writes its COCO results JSON."""
        if self.hparams.predictions_path:
            return Path(self.hparams.predictions_path)
        return Path(self.trainer.default_root_dir) / "predictions.json"
