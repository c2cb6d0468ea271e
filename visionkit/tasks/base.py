"""The base LightningModule of every visionkit task: hyper-parameters, injected modules, optimiser and schedule.

Subclasses build their networks in ``configure_models`` and implement the step methods. ``visionkit.cli`` exposes
every subclass to YAML through ``model.class_path`` (LightningCLI subclass mode). Every ``__init__`` argument is a
plain, typed value, except that a task may accept an ``nn.Module`` (typically ``backbone: str | nn.Module``), which
YAML gives as ``{class_path, init_args}`` (Lightning's dependency injection). Such a module is *not* saved as a
hyper-parameter (that keeps ``.ckpt`` files loadable with ``torch.load(weights_only=True)``); it is handed to
``configure_models`` through :attr:`BaseTask.injected_modules` and its weights are saved in the state dict like any
other. To rebuild such a task from a checkpoint outside the CLI, pass the module again:
``Task.load_from_checkpoint(path, backbone=module)``.

Conventions every task keeps:

- the backbone (the timm-contract model or feature extractor) lives at ``self.backbone``;
- ``freeze_backbone=True`` (linear probing) sets ``requires_grad=False`` on every backbone parameter and keeps the
  backbone in eval mode during training (batch-norm statistics and dropout frozen too);
- ``layer_decay`` (ViTs) gives the backbone's parameter groups timm's layer-wise learning-rate scales
  (``timm.optim.param_groups_layer_decay`` over the backbone's ``group_matcher``); every other parameter has scale 1;
- inside a multi-task module (``visionkit.methods.modsquad.MultiTaskTask``) a task has a :attr:`BaseTask.task_scope`
  (its task name): everything it logs gets that name after the stage (``val/segm_AP`` -> ``val/coco/segm_AP``), and
  it reads its data from the multi-task datamodule's child of that name;
- weight decay spares what any module of the task declares exempt (``no_weight_decay()``,
  ``no_weight_decay_keywords()``, ``param._no_weight_decay``; see :func:`~visionkit.tasks.optim.no_weight_decay_ids`),
  matched by parameter identity, with or without ``layer_decay``, wherever the backbone sits in the task.
"""

from __future__ import annotations

import glob
import inspect
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.utilities.parsing import collect_init_args
from timm.optim import param_groups_layer_decay
from torch import nn

from visionkit.tasks.backbone import resolve_backbone
from visionkit.tasks.optim import build_adamw, no_weight_decay_ids, param_groups_weight_decay, warmup_cosine_factor

__all__ = ["BaseTask"]


class BaseTask(pl.LightningModule):
    """Base task: AdamW with decoupled weight decay, linear warm-up then cosine decay per optimiser step.

    A subclass's ``__init__`` takes its own arguments, then calls ``super().__init__(lr=lr, ...)`` with the shared
    ones. ``BaseTask.__init__`` saves every ``__init__`` argument of the whole class chain as a hyper-parameter except
    those whose value is an ``nn.Module`` (collected in :attr:`injected_modules`) and those named in :attr:`ignore`;
    then it calls :meth:`configure_models`; then it applies ``freeze_backbone``.

    Args:
        lr: Base learning rate.
        weight_decay: AdamW weight decay (biases, norms, tokens and every parameter that a module of the task lists
            in ``no_weight_decay()`` / ``no_weight_decay_keywords()`` are not decayed).
        warmup_steps: Optimiser steps of linear warm-up.
        min_lr_ratio: Learning rate at the last step, as a fraction of ``lr``.
        betas: AdamW betas.
        layer_decay: Layer-wise learning-rate decay of the backbone (BEiT / MAE fine-tuning, e.g. 0.65–0.75): the
            parameters of layer ``i`` of ``L + 1`` groups get ``lr * layer_decay ** (L - i)``, following the
            backbone's ``group_matcher`` (stem = layer 0, block ``j`` = layer ``j + 1``, final norm = last layer).
            ``None`` disables it. Needs ``self.backbone`` with a ``group_matcher`` method (every timm model has one).
            The task's own heads count as the top layer (scale 1) when the backbone has no classifier of its own;
            for a depth-12 ViT, block ``i`` gets ``layer_decay ** (12 - i)`` and the patch embedding
            ``layer_decay ** 13``. (timm groups the final norm with the last block.)
        freeze_backbone: Freeze ``self.backbone`` (no gradients, not in the optimiser, always in eval mode): linear
            probing.

    Attributes:
        injected_modules: ``__init__`` arguments whose value was an ``nn.Module``, by argument name; a subclass reads
            them in ``configure_models`` (``self.injected_modules.get("backbone", self.hparams.backbone)``).
    """

    #: Metric that a ``ModelCheckpoint``/``EarlyStopping`` configured for this task should watch, and its direction.
    monitor: ClassVar[str] = "val/loss"
    mode: ClassVar[str] = "min"
    #: Further ``__init__`` arguments that are not hyper-parameters (module arguments are left out automatically).
    ignore: ClassVar[tuple[str, ...]] = ()
    #: Whether ``fit`` applies: ``False`` for a training-free method (it runs validate / test / predict only).
    trainable: ClassVar[bool] = True
    #: The task's name inside a multi-task module, set by that module (``None``: a standalone task).
    task_scope: str | None = None

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        frame = inspect.currentframe()
        init_args: dict[str, Any] = {}
        for level_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            init_args.update(level_args)
        modules = {name: value for name, value in init_args.items() if isinstance(value, nn.Module)}
        # A plain dict (not a ModuleDict): the modules are registered where configure_models assigns them.
        self.injected_modules: dict[str, nn.Module] = modules
        self.save_hyperparameters(ignore=[*self.ignore, *modules], frame=frame)
        for name in modules:  # recorded as None, so that `self.hparams.backbone` still reads (the module is elsewhere)
            self._hparams[name] = None
            self._hparams_initial[name] = None
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}.")
        self.configure_models()
        if freeze_backbone:
            for param in self._require_backbone("freeze_backbone=True").parameters():
                param.requires_grad_(False)
            self.backbone.eval()

    def configure_models(self) -> None:
        """Build the networks of the task (called once from ``__init__``, after hyper-parameters are saved)."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``; a scoped task (:attr:`task_scope`) logs ``<stage>/<scope>/<rest>`` instead of ``name``.

        The scope already tells the tasks' metrics apart, so a scoped task does not get Lightning's
        ``/dataloader_idx_<i>`` suffix (the multi-task module runs one validation loader per task).
        """
        if self.task_scope:
            stage, sep, rest = name.partition("/")
            name = f"{stage}/{self.task_scope}/{rest}" if sep else f"{self.task_scope}/{name}"
            kwargs["add_dataloader_idx"] = False  # log_dict passes it explicitly
        super().log(name, value, *args, **kwargs)

    def task_datamodule(self) -> Any:
        """The trainer's datamodule, or for a scoped task the multi-task datamodule's child of that name (or None)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.task_scope and datamodule is not None and callable(getattr(datamodule, "datamodule", None)):
            return datamodule.datamodule(self.task_scope)
        return datamodule

    def build_backbone(self, **by_name_kwargs: Any) -> nn.Module:
        """The backbone that the task's hyper-parameters describe, or the module injected as ``backbone``.

        Reads the ``backbone``, ``pretrained``, ``checkpoint_path`` and ``backbone_kwargs`` hyper-parameters.

        Args:
            **by_name_kwargs: Further constructor arguments, used only when the backbone is built by name (e.g.
                ``num_classes``).

        Returns:
            The backbone module (see :func:`~visionkit.tasks.backbone.resolve_backbone`).
        """
        hp = self.hparams
        spec = self.injected_modules.get("backbone", hp.backbone)
        kwargs = dict(hp.backbone_kwargs or {})
        if isinstance(spec, str):
            kwargs.update(by_name_kwargs)
        return resolve_backbone(spec, pretrained=hp.pretrained, checkpoint_path=hp.checkpoint_path, **kwargs)

    def _require_backbone(self, what: str) -> nn.Module:
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(
                f"{what} needs the task's backbone at `self.backbone`, but {type(self).__name__}.configure_models did "
                "not set one."
            )
        return backbone

    def train(self, mode: bool = True) -> BaseTask:
        """Set the training mode; a frozen backbone (``freeze_backbone=True``) stays in eval mode.

        Args:
            mode: Training (``True``) or evaluation (``False``) mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        if self.hparams.get("freeze_backbone") and isinstance(getattr(self, "backbone", None), nn.Module):
            self.backbone.eval()
        return self

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser (frozen parameters left out); override for other learning rates.

        Without ``layer_decay``: one decayed and one non-decayed group over all parameters, ``lr_scale`` 1. With it:
        timm's layer-wise groups over ``self.backbone`` (``lr_scale`` per layer), then the decayed / non-decayed
        groups of every other parameter with ``lr_scale`` 1. In both, the parameters that any module of the task
        declares exempt (:func:`~visionkit.tasks.optim.no_weight_decay_ids`: the backbone's ``no_weight_decay()``
        names, relative to the backbone, wherever it sits) are in a group with ``weight_decay`` 0.

        Returns:
            Groups with ``params``, ``weight_decay`` and ``lr_scale``.

        Raises:
            ValueError: ``layer_decay`` is set but the backbone has no ``group_matcher``.
        """
        weight_decay = float(self.hparams.weight_decay)
        layer_decay = self.hparams.get("layer_decay")
        exempt = no_weight_decay_ids(self)
        if layer_decay is None:
            return param_groups_weight_decay(self.named_parameters(), weight_decay, no_decay_ids=exempt)
        backbone = self._require_backbone("layer_decay")
        if not callable(getattr(backbone, "group_matcher", None)):
            raise ValueError(
                f"layer_decay={layer_decay} needs a backbone with a timm `group_matcher` method to know its layers; "
                f"{type(backbone).__module__}.{type(backbone).__qualname__} has none. Use a timm/visionkit model or "
                "set layer_decay to null."
            )
        # timm matches names with fnmatch: the exempt parameters' own names, escaped, select exactly them.
        exempt_names = [glob.escape(name) for name, param in backbone.named_parameters() if id(param) in exempt]
        backbone_groups = param_groups_layer_decay(
            backbone, weight_decay=weight_decay, no_weight_decay_list=exempt_names, layer_decay=float(layer_decay)
        )
        get_classifier = getattr(backbone, "get_classifier", None)
        classifier = get_classifier() if callable(get_classifier) else None
        if not (isinstance(classifier, nn.Module) and any(True for _ in classifier.parameters())):
            # timm puts unmatched parameters (a classifier) in the top layer, at scale 1. Without one, the task's own
            # head is that top layer: every backbone layer sits one step lower (block i of a depth-12 ViT gets
            # layer_decay ** (12 - i), as in BEiT / MAE / ViTDet).
            for group in backbone_groups:
                group["lr_scale"] *= float(layer_decay)
        backbone_ids = {id(p) for p in backbone.parameters()}
        others = ((name, p) for name, p in self.named_parameters() if id(p) not in backbone_ids)
        return [*backbone_groups, *param_groups_weight_decay(others, weight_decay, no_decay_ids=exempt)]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW and a per-step warm-up + cosine ``LambdaLR`` spanning ``trainer.estimated_stepping_batches``.

        The number of steps is read at the first optimiser step, not here: asking for it in ``configure_optimizers``
        would make Lightning build the training iterator before a resumed run has restored its epoch counter, and the
        resumed epoch would then be shuffled (and its workers seeded) as epoch 0. The factor at step 0 does not
        depend on the total.
        """
        optimizer = build_adamw(self.parameter_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        warmup, min_ratio = int(self.hparams.warmup_steps), float(self.hparams.min_lr_ratio)
        total_steps: int | None = None

        def factor(step: int) -> float:
            nonlocal total_steps
            if total_steps is None:
                if step == 0:
                    return warmup_cosine_factor(0, 1, warmup, min_ratio)
                total_steps = int(self.trainer.estimated_stepping_batches)
            return warmup_cosine_factor(step, total_steps, warmup, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
