"""``MultiTaskTask``: one Mod-Squad MoE ViT trained on several datasets with different heads at once.

The heterogeneous setting of the Mod-Squad line (arXiv 2306.17165): classification, COCO instance segmentation and
ADE20K semantic segmentation share one :class:`~visionkit.models.backbones.modsquad_vit.ModSquadViT` (one router per
task in every MoE layer); each task keeps the head, loss, evaluation and logging of its generic visionkit task
(``InstanceSegmentationTask``: Mask R-CNN on a ViTDet simple pyramid; ``SemanticSegmentationTask``: UperNet;
``ClassificationTask``), built unchanged on a :class:`~visionkit.methods.modsquad.task_view.TaskView` of the shared
backbone. Those task modules sit in ``heads`` and log under their name (``val/coco/segm_AP``, ``val/ade20k/mIoU``,
``val/cls/top1``, ``train/coco/loss``, ...; :attr:`~visionkit.tasks.BaseTask.task_scope`).

Batches come from :class:`~visionkit.data.MultiTaskDataModule`: a training batch is ``{task: sub-batch}``; validation
and test run one loader per task (``CombinedLoader`` in ``sequential`` mode). Sampling (``sampling``;
``docs/methods/modsquad.md``, "Multi-task training"):

- ``"mixed"`` (A, default): every step forwards every task's sub-batch with its task id, one optimiser step;
- ``"per_rank"`` (B): rank ``r`` trains task ``r mod T`` (the datamodule gives it only that task); needs DDP with
  ``find_unused_parameters`` (strategy ``ddp_find_unused_parameters_true``): other tasks' heads and routers get no
  gradient on that rank;
- ``"per_step"`` (C): each step trains one task drawn from ``(seed, step)`` (uniform or by training-set size).

Loss: ``Σ_t w_t · L_t`` (``loss_weights``) or uncertainty weighting, plus ``Σ_layers w_MI · L_MI`` with each layer's
joint task–expert table summed over the step's tasks and over all ranks
(:func:`~visionkit.methods.modsquad.mutual_information_total`).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from visionkit.methods.modsquad.losses import UncertaintyWeighting
from visionkit.methods.modsquad.routing_stats import attach_routing_stats, mutual_information_total
from visionkit.methods.modsquad.task_view import TaskView
from visionkit.tasks import BaseTask, ClassificationTask, InstanceSegmentationTask, SemanticSegmentationTask
from visionkit.utils.seeding import derive_seed

__all__ = ["TASK_KINDS", "MultiTaskTask"]

#: The generic tasks a multi-task model can hold, by the ``kind`` of its task spec.
TASK_KINDS: dict[str, type[BaseTask]] = {
    "classification": ClassificationTask,
    "instance_segmentation": InstanceSegmentationTask,
    "semantic_segmentation": SemanticSegmentationTask,
}
_SPEC_EXCLUDED = ("backbone", "pretrained", "checkpoint_path", "backbone_kwargs", "freeze_backbone", "layer_decay")


class MultiTaskTask(BaseTask):
    """A shared multi-task MoE backbone with one generic task (head, loss, evaluation) per dataset.

    Args:
        backbone: Registered multi-task backbone (``modsquad_vit_test`` / ``_small`` / ``_base``), built with one
            router per entry of ``tasks`` (``task_names``), no classifier and a dynamic image size; or a module.
        tasks: ``{name: {"kind": <TASK_KINDS key>, **arguments of that task}}`` (e.g. ``num_classes``, ``min_size``,
            ``decode_channels``); the backbone, its weights and the optimiser settings are this module's.
        pretrained: Load the backbone's pretrained weights.
        checkpoint_path: Initial backbone weights (e.g. an upcycled dense ViT or an earlier multi-task run).
        backbone_kwargs: Extra backbone constructor arguments.
        sampling: ``"mixed"`` (A), ``"per_rank"`` (B) or ``"per_step"`` (C); must match the datamodule's.
        per_step_weights: Option C's task distribution: ``"uniform"`` or ``"size"`` (proportional to the task's
            training-set size).
        loss_weights: Weight of each task's loss (default 1); ignored with ``loss_weighting="uncertainty"``.
        loss_weighting: ``"fixed"`` (``loss_weights``) or ``"uncertainty"`` (Kendall et al.; one learnt scale per task).
        mi_weight: ``w_MI`` per MoE layer (released 0.005; 0 trains without the mutual-information loss but still
            keeps the usage statistics).
        switch_weight: Switch load-balancing loss weight per layer (0 as in the released MI configs).
        z_weight: Router z-loss weight per layer (0 as released).
        sync_routing_stats: Sum the MI tables over ranks (on by default; the release keeps them per process).
        seed: Seed of option C's task draws (``None``: 0).
        lr: Base learning rate (all parameters; the tasks' own ``lr`` arguments are not used).
        weight_decay: AdamW weight decay.
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        betas: AdamW betas.
        layer_decay: Layer-wise learning-rate decay of the shared backbone.
        freeze_backbone: Train the heads only.
    """

    monitor: ClassVar[str] = "train/loss"
    mode: ClassVar[str] = "min"

    def __init__(
        self,
        backbone: str | nn.Module = "modsquad_vit_test",
        tasks: dict[str, dict[str, Any]] | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        sampling: Literal["mixed", "per_rank", "per_step"] = "mixed",
        per_step_weights: Literal["uniform", "size"] = "uniform",
        loss_weights: dict[str, float] | None = None,
        loss_weighting: Literal["fixed", "uncertainty"] = "fixed",
        mi_weight: float = 0.005,
        switch_weight: float = 0.0,
        z_weight: float = 0.0,
        sync_routing_stats: bool = True,
        seed: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        _check_arguments(tasks, sampling, per_step_weights, loss_weights, loss_weighting)
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            betas=betas,
            layer_decay=layer_decay,
            freeze_backbone=freeze_backbone,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Model
    # ------------------------------------------------------------------------------------------------------------

    def configure_models(self) -> None:
        """Build the shared backbone (with routing statistics) and one generic task per entry of ``tasks``."""
        hp = self.hparams
        names = list(hp.tasks)
        self.backbone = self.build_backbone(num_classes=0, task_names=names, dynamic_img_size=True)
        backbone_tasks = list(getattr(self.backbone, "task_names", []))
        if backbone_tasks != names:
            raise ValueError(f"the backbone's tasks {backbone_tasks} differ from the configured tasks {names}")
        self.routing_stats = attach_routing_stats(self.backbone, sync_across_ranks=hp.sync_routing_stats)
        heads = {}
        # LightningCLI hands its config to save_hyperparameters through a context variable that is still set while
        # this module is built: the task modules would take this module's hyper-parameters. They save their own.
        token = _given_hyperparameters.set(None)
        try:
            for name, spec in hp.tasks.items():
                arguments = {key: value for key, value in spec.items() if key != "kind"}
                task = TASK_KINDS[spec["kind"]](backbone=TaskView(self.backbone, name), **arguments)
                task.task_scope = name
                heads[name] = task
        finally:
            _given_hyperparameters.reset(token)
        self.heads = nn.ModuleDict(heads)
        self.uncertainty = UncertaintyWeighting(len(names)) if hp.loss_weighting == "uncertainty" else None

    @property
    def task_names(self) -> list[str]:
        """The tasks, in the order of the backbone's routers."""
        return list(self.heads)

    def forward(self, images: Any, task: str) -> Any:
        """The output of task ``task``'s module for its inputs (logits, label maps or detections)."""
        return self.heads[task](images)

    def _run(self, task: BaseTask, hook: str, *args: Any) -> Any:
        """Call a hook of a task module in this module's Lightning context (so that its ``self.log`` works)."""
        if task._trainer is not self._trainer:  # Lightning attaches the trainer to direct children only
            task.trainer = self._trainer
        task._current_fx_name = self._current_fx_name
        try:
            return getattr(task, hook)(*args)
        finally:
            task._current_fx_name = None

    # ------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------

    def step_tasks(self, batch: dict[str, Any]) -> list[str]:
        """The tasks this training step forwards: every task of the batch, or option C's draw among them.

        Args:
            batch: ``{task: sub-batch}``.

        Returns:
            Task names, in model order.
        """
        unknown = sorted(set(batch) - set(self.heads))
        if unknown:
            raise KeyError(f"training batch has tasks {unknown} that the model does not have ({self.task_names})")
        present = [name for name in self.heads if name in batch]
        if self.hparams.sampling != "per_step" or len(present) == 1:
            return present
        weights = np.ones(len(present))
        if self.hparams.per_step_weights == "size":
            weights = np.array([self._train_size(name) for name in present], dtype=np.float64)
        seed = 0 if self.hparams.seed is None else int(self.hparams.seed)
        rng = np.random.default_rng([seed, int(self.global_step)])  # the same draw on every rank and after a resume
        return [present[int(rng.choice(len(present), p=weights / weights.sum()))]]

    def _train_size(self, name: str) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not callable(getattr(datamodule, "datamodule", None)):
            raise RuntimeError("per_step_weights='size' needs a MultiTaskDataModule (it reads the training-set sizes)")
        return len(datamodule.datamodule(name).dataset("train"))

    def combine_losses(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the task losses of one step (``loss_weights`` or uncertainty weighting)."""
        if self.uncertainty is not None:
            indices = [self.task_names.index(name) for name in losses]
            return self.uncertainty(list(losses.values()), tasks=indices)
        weights = self.hparams.loss_weights or {}
        return sum(float(weights.get(name, 1.0)) * loss for name, loss in losses.items())

    def on_fit_start(self) -> None:
        """Check the datamodule against the model: known task names, the same per-rank choice of tasks.

        Raises:
            ValueError: The datamodule has tasks the model lacks, or only one of the two uses ``per_rank``.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "task_names", None) or [])
        unknown = [name for name in names if name not in self.heads]
        if unknown:
            raise ValueError(f"the datamodule's tasks {unknown} are not tasks of the model ({self.task_names})")
        sampling = getattr(datamodule, "sampling", None)
        if sampling is not None and (sampling == "per_rank") != (self.hparams.sampling == "per_rank"):
            raise ValueError(
                f"sampling differs: the model's is {self.hparams.sampling!r}, the datamodule's {sampling!r}; "
                "per_rank must be set on both (the datamodule gives each rank its task)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed torch from ``(seed, step, rank)`` before each step.

        Dropout, drop path and the detector's box sampling of a step are then the same in a run resumed mid-epoch as
        in an uninterrupted one (the data side seeds every item: ``MultiTaskDataModule``).
        """
        base = self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(derive_seed(int(base), int(self.global_step), int(self.global_rank)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Each selected task's own training step (it logs ``train/<task>/...``), the weighted sum, the MI loss."""
        losses = {
            name: self._run(self.heads[name], "training_step", batch[name], batch_idx)
            for name in self.step_tasks(batch)
        }
        task_loss = self.combine_losses(losses)
        hp = self.hparams
        # Every rank, every step, even with zero weights: it is the collective and commits the usage statistics.
        routing_loss = mutual_information_total(
            self.routing_stats, weight=hp.mi_weight, switch_weight=hp.switch_weight, z_weight=hp.z_weight
        )
        loss = task_loss + routing_loss
        self.log("train/routing_loss", routing_loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation: one loader per task (sequential), each handled by its task module
    # ------------------------------------------------------------------------------------------------------------

    def _stage_tasks(self, stage: str) -> list[str]:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        if isinstance(loaders, dict):
            return [name for name in loaders if name in self.heads]
        raise TypeError(
            f"MultiTaskTask needs one {stage} loader per task, by name (MultiTaskDataModule gives a CombinedLoader of "
            f"a dict); got {type(loaders).__name__}"
        )

    def _evaluation_hook(self, stage: str, hook: str) -> None:
        for name in self._stage_tasks(stage):
            self._run(self.heads[name], hook)

    def _evaluation_step(self, stage: str, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        name = self._stage_tasks(stage)[dataloader_idx]
        self._run(self.heads[name], f"{'validation' if stage == 'val' else 'test'}_step", batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        """Every task's ``on_validation_epoch_start`` (evaluators reset or built)."""
        self._evaluation_hook("val", "on_validation_epoch_start")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """The validation step of the task whose loader this batch comes from."""
        self._evaluation_step("val", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        """Every task's metrics, logged under its name (``val/coco/segm_AP``, ``val/ade20k/mIoU``, ``val/cls/top1``)."""
        self._evaluation_hook("val", "on_validation_epoch_end")

    def on_test_epoch_start(self) -> None:
        """Every task's ``on_test_epoch_start``."""
        self._evaluation_hook("test", "on_test_epoch_start")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """The test step of the task whose loader this batch comes from."""
        self._evaluation_step("test", batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """Every task's test metrics, under its name."""
        self._evaluation_hook("test", "on_test_epoch_end")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Not supported: extract the task (``tools/extract_task_model.py``) and predict with its single-task config."""
        raise NotImplementedError(
            "MultiTaskTask does not predict; extract one task with tools/extract_task_model.py and run predict with "
            "that task's single-task config"
        )


def _check_arguments(
    tasks: dict[str, dict[str, Any]] | None,
    sampling: str,
    per_step_weights: str,
    loss_weights: dict[str, float] | None,
    loss_weighting: str,
) -> None:
    if not tasks:
        raise ValueError("MultiTaskTask needs `tasks`: {name: {kind: ..., <task arguments>}}")
    for name, spec in tasks.items():
        if not isinstance(spec, dict) or spec.get("kind") not in TASK_KINDS:
            raise ValueError(f"task {name!r}: its spec needs `kind`, one of {sorted(TASK_KINDS)}; got {spec!r}")
        shared = sorted(set(spec) & set(_SPEC_EXCLUDED))
        if shared:
            raise ValueError(f"task {name!r}: {shared} are settings of the shared backbone; set them on MultiTaskTask")
    if sampling not in ("mixed", "per_rank", "per_step"):
        raise ValueError(f"sampling must be 'mixed', 'per_rank' or 'per_step', got {sampling!r}")
    if per_step_weights not in ("uniform", "size"):
        raise ValueError(f"per_step_weights must be 'uniform' or 'size', got {per_step_weights!r}")
    if loss_weighting not in ("fixed", "uncertainty"):
        raise ValueError(f"loss_weighting must be 'fixed' or 'uncertainty', got {loss_weighting!r}")
    unknown = sorted(set(loss_weights or {}) - set(tasks))
    if unknown:
        raise ValueError(f"loss_weights names tasks {unknown} that are not in `tasks` ({sorted(tasks)})")
