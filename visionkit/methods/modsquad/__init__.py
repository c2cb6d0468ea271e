"""Mod-Squad: mixture-of-experts ViT as a modular multi-task learner (Chen et al., CVPR 2023, arXiv 2212.08066).

The method-level pieces around the MoE layers (``visionkit.models.layers``: ``TaskMoE``, ``MoAttention``): the
mutual-information loss and the other routing losses, per-layer routing statistics (synchronised across ranks, usage
EMA stored in the model), per-task expert extraction, router-only tuning, continual learning and usage monitoring
(``docs/methods/modsquad.md``: the facts, their sources and every deviation from the release). The model and its
layers live below ``methods/`` so that ``create_model`` finds them after ``import visionkit``; they are re-exported
here with the method's other public names.
"""

from visionkit.methods.modsquad.callbacks import ExpertUsageCallback, usage_entropy, usage_heatmap
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
from visionkit.methods.modsquad.routing_stats import (
    RoutingStats,
    attach_routing_stats,
    detach_routing_stats,
    find_routing_stats,
    moe_layers,
    mutual_information_total,
)
from visionkit.models.backbones.modsquad_upcycle import UpcycleReport
from visionkit.models.backbones.modsquad_vit import ModSquadViT
from visionkit.models.layers import MoAttention, Routing, TaskMoE

__all__ = [
    "REMOVED_ROUTER_ATTR",
    "ExpertUsageCallback",
    "ExtractionReport",
    "LayerExtraction",
    "MoAttention",
    "ModSquadViT",
    "Routing",
    "RoutingStats",
    "TaskMoE",
    "UncertaintyWeighting",
    "UpcycleReport",
    "add_task",
    "attach_routing_stats",
    "detach_routing_stats",
    "expert_holder",
    "extract_layer",
    "extract_task_model",
    "find_routing_stats",
    "freeze_for_router_tuning",
    "moe_layers",
    "mutual_information_loss",
    "mutual_information_total",
    "select_experts",
    "switch_loss",
    "usage_entropy",
    "usage_heatmap",
    "z_loss",
]
