"""Cut one task out of a trained :class:`~visionkit.methods.modsquad.MultiTaskTask` as a standalone generic task.

:func:`export_task` extracts the task's experts from the shared backbone
(:func:`~visionkit.methods.modsquad.extract_task_model`: per MoE layer the experts the task uses, its router, its
task-embedding row), builds the task's generic visionkit task **by name** (``InstanceSegmentationTask`` /
``SemanticSegmentationTask`` / ``ClassificationTask`` with ``backbone: modsquad_vit_*`` and the extracted expert
counts in ``backbone_kwargs``), and fills it with the extracted backbone and the task's head. Its ``state_dict`` is
what ``tools/extract_task_model.py`` writes; the returned ``{"class_path", "init_args"}`` (with
``init_checkpoint`` pointing at that file) is the ``model:`` section of a single-task config, so ``tools/eval.py
validate`` and fine-tuning run on it unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from visionkit.methods.modsquad.extraction import ExtractionReport, expert_holder, extract_task_model
from visionkit.methods.modsquad.multitask import TASK_KINDS, MultiTaskTask
from visionkit.methods.modsquad.routing_stats import detach_routing_stats, moe_layers
from visionkit.models.layers import MoAttention
from visionkit.tasks import BaseTask
from visionkit.tasks.callbacks import read_checkpoint

__all__ = ["export_task", "extracted_backbone_kwargs", "load_multitask_checkpoint"]


def extracted_backbone_kwargs(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild an extracted single-task ``ModSquadViT`` by name.

    Args:
        model: A ``ModSquadViT`` after :func:`~visionkit.methods.modsquad.extract_task_model`.

    Returns:
        ``task_names``, ``attn_experts`` / ``mlp_experts`` (one count per MoA / MoE-MLP layer) and
        ``removed_router_rows`` (one per MoE layer; only when some layer keeps removed router rows).
    """
    attn, mlp, removed = [], [], []
    for layer in moe_layers(model).values():
        (attn if isinstance(layer, MoAttention) else mlp).append(int(layer.num_experts))
        extra = getattr(expert_holder(layer), "removed_router", None)
        removed.append(int(extra.weight.shape[0]) if extra is not None else 0)
    kwargs: dict[str, Any] = {"task_names": list(model.task_names), "attn_experts": attn, "mlp_experts": mlp}
    if any(removed):
        kwargs["removed_router_rows"] = removed
    return kwargs


def load_multitask_checkpoint(path: str | os.PathLike[str]) -> MultiTaskTask:
    """A :class:`MultiTaskTask` rebuilt from the hyper-parameters of its Lightning checkpoint, weights loaded strictly.

    The file is read safely (``torch.load(weights_only=True)`` after the checks of
    :func:`~visionkit.tasks.callbacks.read_checkpoint`).

    Raises:
        ValueError: The file cannot be read, or it is not the checkpoint of a ``MultiTaskTask`` run.
    """
    checkpoint, problem = read_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"cannot read {path}: {problem}")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "tasks" not in hparams:
        raise ValueError(f"{path} is not a MultiTaskTask checkpoint (its hyper-parameters have no `tasks`)")
    # LightningCLI's bookkeeping entries (_class_path, _instantiator) are not arguments
    module = MultiTaskTask(**{key: value for key, value in hparams.items() if not key.startswith("_")})
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def _module_prefix(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError(f"{type(target).__name__} is not inside {type(root).__name__}")


def export_task(
    module: MultiTaskTask, task: str, thresh: float = 3.0, keep_softmax_mass: bool = False
) -> tuple[BaseTask, ExtractionReport, dict[str, Any]]:
    """A standalone generic task holding ``task``'s experts and head.

    Args:
        module: The trained multi-task module (its backbone given by name, with routing statistics).
        task: The task to cut out (a key of ``module.hparams.tasks``).
        thresh: Expert selection threshold (:func:`~visionkit.methods.modsquad.select_experts`; released 3).
        keep_softmax_mass: Keep the removed experts' router rows so that the outputs equal the multi-task model's
            wherever no selected expert was removed (``docs/methods/modsquad.md``, extraction).

    Returns:
        ``(task_module, report, model_config)``: the standalone task in eval mode, what was kept per layer, and
        ``{"class_path", "init_args"}`` that rebuilds it (add ``init_checkpoint`` for its weights).

    Raises:
        KeyError: Unknown task.
        ValueError: The backbone was injected as a module (there is no name to rebuild it by).
    """
    hp = module.hparams
    if task not in hp.tasks:
        raise KeyError(f"unknown task {task!r}; the model's tasks are {list(hp.tasks)}")
    if not isinstance(hp.backbone, str):
        raise ValueError("export_task needs a backbone given by name (modsquad_vit_*), not an injected module")
    backbone, report = extract_task_model(module.backbone, task, thresh=thresh, keep_softmax_mass=keep_softmax_mass)
    detach_routing_stats(backbone)
    spec = dict(hp.tasks[task])
    task_class = TASK_KINDS[spec.pop("kind")]
    backbone_kwargs = {
        **dict(hp.backbone_kwargs or {}),
        "dynamic_img_size": True,
        **extracted_backbone_kwargs(backbone),
    }
    init_args = {"backbone": hp.backbone, "backbone_kwargs": backbone_kwargs, **spec}
    standalone = task_class(**init_args)
    prefix = _module_prefix(standalone, standalone.backbone)
    backbone_state, head_state = backbone.state_dict(), module.heads[task].state_dict()
    state = {}
    for key in standalone.state_dict():
        source, name = (backbone_state, key[len(prefix) :]) if key.startswith(prefix) else (head_state, key)
        if name not in source:
            raise KeyError(f"{key!r} of the standalone {task_class.__name__} has no source ({name!r})")
        state[key] = source[name]
    standalone.load_state_dict(state, strict=True)
    return (
        standalone.eval(),
        report,
        {"class_path": f"{task_class.__module__}.{task_class.__name__}", "init_args": init_args},
    )
