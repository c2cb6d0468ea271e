"""Mod-Squad's mixture of attention heads (MoA) with per-task routers: ``MoETaskAttention`` of the release.

Follows ``models_moe.py`` (``MoETaskAttention``) of ``UMass-Foundation-Model/Mod-Squad`` at ``1d17e81``, after Zhang
et al., "Mixture of Attention Heads" (``docs/methods/modsquad.md``). Each of the ``E`` experts is one attention head's
query projection ``W_q[e]`` (dim → head_dim) and output projection ``W_o[e]`` (head_dim → dim), bias-free; keys and
values come from one shared ``kv_proj`` (multi-query attention), which is what lets every token pick its own heads.
For a token ``x_i`` routed to experts ``e_i1..e_ik`` (ranked) with gates ``g_ij``::

    q_ij = x_i W_q[e_ij];   [k_t, v_t] = kv_proj(x_t)
    o_ij = Σ_t softmax_t(q_ij · k_t · head_dim^-0.5) v_t
    y_i  = Σ_j g_ij · o_ij W_o[e_ij]

There is no dense output projection. The release clamps infinite attention logits to the dtype's range (seen under
fp16 autocast); here attention runs through ``F.scaled_dot_product_attention``, whose fused kernels take the
softmax in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from visionkit.models.layers.task_moe import RoutingHook, TaskMoE
from visionkit.ops.moe import MoEBackend

__all__ = ["MoAttention"]


class MoAttention(nn.Module):
    """Task-routed mixture of attention heads: ``k`` of ``E`` query/output experts per token, shared keys/values.

    State dict (as released): ``q_proj.f_gate.<t>.0.weight`` ``(E, dim)`` (``(2E, dim)`` when noisy),
    ``q_proj.experts.w`` ``(E, dim, head_dim)``, ``q_proj.output_experts.w`` ``(E, head_dim, dim)``,
    ``kv_proj.0.weight`` ``(2·head_dim, dim)``, ``kv_proj.0.bias`` ``(2·head_dim,)`` (keys first, then values).
    Routing hooks registered here are called with ``q_proj`` (the :class:`TaskMoE` router) and its ``Routing``.

    Args:
        dim: Token width ``D``.
        num_experts: ``E`` (Mod-Squad ViT-B: 24).
        k: Heads per token (ViT-B: 12).
        head_dim: Per-head width (ViT-B: 128).
        num_tasks: Number of routers.
        noisy_gating: Noisy routers (``TaskMoE``).
        qkv_bias: Bias of ``kv_proj`` (the release always has one; the query experts never do).
        attn_drop: Dropout on the attention probabilities (training only).
        proj_drop: Dropout on the output.
        backend: Dispatch backend of the query/output experts (``visionkit.ops.moe``).
        renormalize_gates: As in :class:`TaskMoE`.
        noise_at_eval: As in :class:`TaskMoE`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int,
        head_dim: int,
        num_tasks: int,
        noisy_gating: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: MoEBackend = "auto",
        renormalize_gates: bool = False,
        noise_at_eval: bool = True,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.attn_drop = attn_drop
        self.q_proj = TaskMoE(
            dim,
            head_dim,
            num_experts,
            k,
            num_tasks,
            noisy_gating=noisy_gating,
            bias=False,
            activation=None,
            backend=backend,
            renormalize_gates=renormalize_gates,
            noise_at_eval=noise_at_eval,
        )
        self.kv_proj = nn.Sequential(nn.Linear(dim, 2 * head_dim, bias=qkv_bias))
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def num_experts(self) -> int:
        """``E``."""
        return self.q_proj.num_experts

    @property
    def k(self) -> int:
        """Heads (experts) per token."""
        return self.q_proj.k

    @property
    def num_tasks(self) -> int:
        """Number of routers."""
        return self.q_proj.num_tasks

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Register ``hook(q_proj, routing)``, called on every forward (see :meth:`TaskMoE.register_routing_hook`)."""
        return self.q_proj.register_routing_hook(hook)

    def forward(self, x: Tensor, task: int) -> Tensor:
        """Attention with task ``task``'s head selection.

        Args:
            x: ``(B, L, D)`` tokens.
            task: Task id (a Python int).

        Returns:
            ``(B, L, D)``.
        """
        b, length, _ = x.shape
        q, routing, dispatch = self.q_proj.map(x, task)  # (B, L, k, hd)
        key, value = self.kv_proj(x).chunk(2, dim=-1)  # (B, L, hd) each
        # one shared K/V head: the k query heads of all L tokens are one head of L·k queries (no K/V copies)
        o = F.scaled_dot_product_attention(
            q.reshape(b, 1, length * self.k, self.head_dim),
            key.unsqueeze(1),
            value.unsqueeze(1),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        y = self.q_proj.reduce(o.view(b, length, self.k, self.head_dim), routing, dispatch)
        return self.proj_drop(y)

    def extra_repr(self) -> str:  # noqa: D102
        return f"head_dim={self.head_dim}, attn_drop={self.attn_drop}"
