"""Mod-Squad: mixture-of-experts ViT as a modular multi-task learner (Chen et al., CVPR 2023, arXiv 2212.08066).

The method-level pieces around the MoE layers (``visionkit.models.layers``: ``TaskMoE``, ``MoAttention``): the
mutual-information loss and the other routing losses, per-layer routing statistics (synchronised across ranks, usage
EMA stored in the model), per-task expert extraction, router-only tuning, continual learning and usage monitoring; and
the heterogeneous multi-task training of its follow-up (arXiv 2306.17165): ``MultiTaskTask`` (one shared backbone, one
generic task per dataset) and ``export_task`` (one task cut out as a standalone generic task).
``docs/methods/modsquad.md`` has the facts, their sources and every deviation from the release. The model and its
layers live below ``methods/`` so that ``create_model`` finds them after ``import visionkit``; they are re-exported
here with the method's other public names.
"""

from visionkit.methods.modsquad.callbacks import (
    ExpertUsageCallback,
    RouterTuning,
    topk_overlap,
    usage_entropy,
    usage_heatmap,
)
from visionkit.methods.modsquad.extraction import (
    REMOVED_ROUTER_ATTR,
    ExtractionReport,
    LayerExtraction,
    add_task,
    expert_holder,
    extract_layer,
    extract_task_model,
    freeze_for_router_tuning,
    select_experts,
)
from visionkit.methods.modsquad.losses import UncertaintyWeighting, mutual_information_loss, switch_loss, z_loss
from visionkit.methods.modsquad.multitask import TASK_KINDS, MultiTaskTask
from visionkit.methods.modsquad.routing_stats import (
    RoutingStats,
    attach_routing_stats,
    detach_routing_stats,
    find_routing_stats,
    moe_layers,
    mutual_information_total,
)
from visionkit.methods.modsquad.task_export import export_task, extracted_backbone_kwargs, load_multitask_checkpoint
from visionkit.methods.modsquad.task_view import TaskView
from visionkit.models.backbones.modsquad_upcycle import UpcycleReport
from visionkit.models.backbones.modsquad_vit import ModSquadViT
from visionkit.models.layers import MoAttention, Routing, TaskMoE

__all__ = [
    "REMOVED_ROUTER_ATTR",
    "TASK_KINDS",
    "ExpertUsageCallback",
    "ExtractionReport",
    "LayerExtraction",
    "MoAttention",
    "ModSquadViT",
    "MultiTaskTask",
    "RouterTuning",
    "Routing",
    "RoutingStats",
    "TaskMoE",
    "TaskView",
    "UncertaintyWeighting",
    "UpcycleReport",
    "add_task",
    "attach_routing_stats",
    "detach_routing_stats",
    "expert_holder",
    "export_task",
    "extract_layer",
    "extract_task_model",
    "extracted_backbone_kwargs",
    "find_routing_stats",
    "freeze_for_router_tuning",
    "load_multitask_checkpoint",
    "moe_layers",
    "mutual_information_loss",
    "mutual_information_total",
    "select_experts",
    "switch_loss",
    "topk_overlap",
    "usage_entropy",
    "usage_heatmap",
    "z_loss",
]
