"""Reusable layers (plain nn.Modules).

Mod-Squad's task-routed MoE MLP and mixture of attention heads; the Linear / LayerNorm initialisation the backbones
share (``init``).
"""

from visionkit.models.layers.init import init_linear_and_norm
from visionkit.models.layers.mo_attention import MoAttention
from visionkit.models.layers.task_moe import ParallelExperts, Routing, RoutingHook, TaskMoE

__all__ = ["MoAttention", "ParallelExperts", "Routing", "RoutingHook", "TaskMoE", "init_linear_and_norm"]
