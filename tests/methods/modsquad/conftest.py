"""A small hand-built multi-task MoE model (one MoAttention + one TaskMoE block) for the Mod-Squad method tests.

It uses the documented model-level names (``task_names``, ``num_tasks``, ``task_embedding`` ``(1, T, D)``,
``task_heads``) that extraction and continual learning rely on; routers get random (not zero) weights so that tokens
spread over experts.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from visionkit.models.layers import MoAttention, TaskMoE


class ToyModSquad(nn.Module):
    """Task embedding → MoA block → MoE-MLP block → mean pool → per-task linear head."""

    def __init__(
        self,
        dim: int = 8,
        task_names: tuple[str, ...] = ("a", "b"),
        attn_experts: int = 6,
        attn_k: int = 2,
        mlp_experts: int = 8,
        mlp_k: int = 2,
        noisy: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            num_tasks = len(task_names)
            self.task_names = list(task_names)
            self.num_tasks = num_tasks
            self.task_embedding = nn.Parameter(torch.randn(1, num_tasks, dim, generator=generator) * 0.5)
            self.norm1 = nn.LayerNorm(dim)
            self.attn = MoAttention(dim, attn_experts, attn_k, 4, num_tasks, noisy_gating=noisy, backend="loop")
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = TaskMoE(dim, 12, mlp_experts, mlp_k, num_tasks, noisy_gating=noisy, backend="loop")
            self.task_heads = nn.ModuleList(nn.Linear(dim, 3) for _ in task_names)
        for gate in [*self.attn.q_proj.f_gate, *self.mlp.f_gate]:
            with torch.no_grad():
                gate[0].weight.copy_(torch.randn(gate[0].weight.shape, generator=generator))

    def forward(self, x: Tensor, task: int | str) -> Tensor:
        """``(B, L, D)`` tokens of one task → ``(B, 3)`` logits."""
        t = self.task_names.index(task) if isinstance(task, str) else task
        x = x + self.task_embedding[:, t : t + 1]
        x = x + self.attn(self.norm1(x), t)
        x = x + self.mlp(self.norm2(x), t)
        return self.task_heads[t](x.mean(1))


@pytest.fixture
def toy_model_cls() -> type[ToyModSquad]:
    return ToyModSquad
