"""Mod-Squad's task-routed mixture of experts (``TaskMoE``): one router per task over experts shared by all tasks.

Follows ``parallel_linear/parallel_experts/moe.py`` (``TaskMoE``, ``MoE``) and ``parallel_experts.py``
(``ParallelExperts``) of ``UMass-Foundation-Model/Mod-Squad`` at ``1d17e81``; parameter names, layouts and
initialisation are the release's, so its state dicts load unchanged (``docs/methods/modsquad.md``). The dispatch is
visionkit's own (``visionkit/ops/moe.py``, ``docs/ops/moe.md``): no host sync outside the CPU ``loop`` backend.

The router of task ``t`` (``TaskMoE.route``), on tokens ``x`` ``(N, D)``:

* ``raw = f_gate[t](x)``, a bias-free ``Linear(D, E)`` (``2E`` with noisy gating), zero-initialised;
* noisy gating: ``logits, s = raw.chunk(2)``; ``logits += randn · (softplus(s) + 1e-2)``; the release applies the noise
  in eval mode too (its ``self.training`` guard is commented out): ``noise_at_eval=True`` keeps that;
* ``probs = softmax(logits) + 1e-4`` over all ``E`` experts; ``gates, topk_idx = probs.topk(k)``, the raw top-k
  probabilities (not renormalised; ``renormalize_gates=True`` divides them by their sum).

At zero init every probability is equal and ``topk`` picks among ties in an implementation-defined order (on CPU,
torch 2.14 returns the same, not the lowest, ids for every token, e.g. 10, 11, 12, 9 of 16); all tokens then share
one expert set until the router weights move. The released model re-initialises every ``nn.Linear`` (routers included)
with timm's ViT init after construction, so the full model's routers do not start at zero (``docs/ops/moe.md``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from visionkit.ops.moe import (
    MOE_BACKENDS,
    MoEBackend,
    MoEDispatch,
    expert_map,
    expert_reduce,
    moe_dispatch,
    moe_mlp,
    resolve_moe_backend,
)

__all__ = ["ParallelExperts", "Routing", "RoutingHook", "TaskMoE"]


class Routing(NamedTuple):
    """One router call of a :class:`TaskMoE`, as routing hooks receive it.

    Attributes:
        task: The task id the router of which ran.
        logits: ``(N, E)`` logits the softmax was taken of (noise included when noisy gating added it).
        probs: ``(N, E)`` ``softmax(logits) + 1e-4``, the full soft distribution, with grad.
        topk_idx: ``(N, k)`` int64 experts, column ``j`` = ``j``-th largest probability.
        gates: ``(N, k)`` gates of those experts (the raw probabilities unless renormalised), with grad.
    """

    task: int
    logits: Tensor
    probs: Tensor
    topk_idx: Tensor
    gates: Tensor


#: A routing hook: called with the layer and its :class:`Routing` on every forward.
RoutingHook = Callable[[nn.Module, Routing], None]


class ParallelExperts(nn.Module):
    """``E`` independent linear maps stored as one ``(E, in, out)`` weight ``w`` and an ``(E, out)`` bias ``b``.

    Initialisation as released: ``w ~ U(-1/in, 1/in)`` (not ``1/sqrt(in)``) and ``b ~ U(-1/sqrt(out), 1/sqrt(out))``
    (the release takes the fan-in of ``w[0]`` laid out ``(in, out)``, which reads ``out``).

    Args:
        num_experts: ``E``.
        in_features: Input width.
        out_features: Output width.
        bias: Whether to hold ``b``.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.b = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw ``w`` and ``b`` with the release's bounds."""
        nn.init.uniform_(self.w, -1.0 / self.w.shape[1], 1.0 / self.w.shape[1])
        if self.b is not None:
            bound = 1.0 / math.sqrt(self.w.shape[2])
            nn.init.uniform_(self.b, -bound, bound)

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_experts={self.w.shape[0]}, in_features={self.w.shape[1]}, out_features={self.w.shape[2]}"


class TaskMoE(nn.Module):
    """Top-k MoE MLP with one router per task: ``y = Σ_j gate_j · W2[e_j] act(W1[e_j] x + b1[e_j]) + b2[e_j]``.

    State dict (as released): ``f_gate.<t>.0.weight`` ``(E, dim)`` (``(2E, dim)`` when noisy), ``experts.w``
    ``(E, dim, hidden)``, ``experts.b`` ``(E, hidden)``, ``output_experts.w`` ``(E, hidden, dim)``,
    ``output_experts.b`` ``(E, dim)`` (no biases with ``bias=False``).

    Args:
        dim: Token width ``D``.
        hidden_dim: Expert hidden width (Mod-Squad ViT-B: 3072 / 4 = 768).
        num_experts: ``E``.
        k: Experts per token (capped at ``E`` as released).
        num_tasks: Number of routers.
        noisy_gating: Router emits ``2E`` values, the second half a learned noise scale.
        bias: Expert biases.
        activation: Module class applied between the two maps (None: identity, as in MoA's query map).
        backend: Dispatch backend (``visionkit.ops.moe``); ``"dense"`` runs all experts per token.
        renormalize_gates: Divide the top-k gates by their sum (a deviation; the release does not).
        noise_at_eval: With noisy gating, add noise in eval mode too (the release does).
        noise_epsilon: Floor added to the softplus noise scale (release: 1e-2).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        k: int,
        num_tasks: int,
        noisy_gating: bool = False,
        bias: bool = True,
        activation: type[nn.Module] | Callable[[], nn.Module] | None = nn.GELU,
        backend: MoEBackend = "auto",
        renormalize_gates: bool = False,
        noise_at_eval: bool = True,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        if min(dim, hidden_dim, num_experts, k, num_tasks) < 1:
            raise ValueError("dim, hidden_dim, num_experts, k and num_tasks must all be >= 1")
        if backend not in MOE_BACKENDS:
            raise ValueError(f"unknown MoE backend {backend!r}, expected one of {MOE_BACKENDS}")
        self.num_experts = num_experts
        self.k = min(k, num_experts)
        self.num_tasks = num_tasks
        self.noisy_gating = noisy_gating
        self.backend = backend
        self.renormalize_gates = renormalize_gates
        self.noise_at_eval = noise_at_eval
        self.noise_epsilon = noise_epsilon
        self.experts = ParallelExperts(num_experts, dim, hidden_dim, bias)
        self.output_experts = ParallelExperts(num_experts, hidden_dim, dim, bias)
        self.activation = activation() if activation is not None else None
        gate_out = 2 * num_experts if noisy_gating else num_experts
        self.f_gate = nn.ModuleList(nn.Sequential(nn.Linear(dim, gate_out, bias=False)) for _ in range(num_tasks))
        for gate in self.f_gate:
            nn.init.zeros_(gate[0].weight)
        # Router rows of experts cut out by extraction with keep_softmax_mass (visionkit.methods.modsquad): their
        # logits stay in the softmax's denominator, so the kept experts' gates equal the full model's. None: released.
        self.removed_router: nn.Linear | None = None
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(self, routing)`` on every router call (every forward, or every ``map``).

        Args:
            hook: Receives this layer and the :class:`Routing`; its tensors carry grad (detach to keep statistics).

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def route(self, x: Tensor, task: int) -> Routing:
        """Run task ``task``'s router on tokens ``x`` ``(N, D)`` and call the routing hooks (module docstring)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} routers")
        raw = self.f_gate[task](x)
        if self.noisy_gating:
            logits, raw_std = raw.chunk(2, dim=-1)
            if self.training or self.noise_at_eval:
                logits = logits + torch.randn_like(logits) * (F.softplus(raw_std) + self.noise_epsilon)
        else:
            logits = raw
        if self.removed_router is None:
            probs = torch.softmax(logits, dim=-1) + 1e-4
        else:
            every_logit = torch.cat([logits, self.removed_router(x).to(logits.dtype)], dim=-1)
            probs = torch.exp(logits - torch.logsumexp(every_logit, dim=-1, keepdim=True)) + 1e-4
        gates, topk_idx = probs.topk(self.k, dim=-1)
        if self.renormalize_gates:
            gates = gates / gates.sum(-1, keepdim=True)
        routing = Routing(task, logits, probs, topk_idx, gates)
        for hook in self._routing_hooks.values():
            hook(self, routing)
        return routing

    def forward(self, x: Tensor, task: int) -> Tensor:
        """MoE MLP of task ``task``'s routing.

        Args:
            x: ``(B, L, D)`` tokens.
            task: Task id (a Python int: the whole batch belongs to one task).

        Returns:
            ``(B, L, D)``.
        """
        flat = x.reshape(-1, x.shape[-1])
        r = self.route(flat, task)
        e, o = self.experts, self.output_experts
        y = moe_mlp(flat, r.topk_idx, r.gates, e.w, e.b, o.w, o.b, self.activation, self.backend)
        return y.view(x.shape)

    def map(self, x: Tensor, task: int) -> tuple[Tensor, Routing, MoEDispatch | None]:
        """First expert map only, each token's ``k`` outputs kept apart (MoA's per-token query heads).

        Args:
            x: ``(B, L, D)`` tokens.
            task: Task id.

        Returns:
            ``h`` ``(B, L, k, hidden)`` with ``h[..., j, :]`` from the token's ``j``-th ranked expert (no activation),
            the :class:`Routing`, and the dispatch to hand to :meth:`reduce` (None for the ``"dense"`` backend).
        """
        b, length, d = x.shape
        flat = x.reshape(-1, d)
        r = self.route(flat, task)
        backend = resolve_moe_backend(self.backend, flat, self.experts.w)
        dispatch = None if backend == "dense" else moe_dispatch(r.topk_idx, self.num_experts)
        h = expert_map(flat, self.experts.w, self.experts.b, r.topk_idx, backend, dispatch)
        return h.view(b, length, self.k, h.shape[-1]), r, dispatch

    def reduce(self, h: Tensor, routing: Routing, dispatch: MoEDispatch | None) -> Tensor:
        """Second expert map of each slot, gate-weighted and summed over the ``k`` slots.

        Args:
            h: ``(B, L, k, hidden)`` per-slot inputs (slot order of :meth:`map`).
            routing: The :class:`Routing` :meth:`map` returned.
            dispatch: The dispatch :meth:`map` returned.

        Returns:
            ``(B, L, D)``.
        """
        b, length, k, c = h.shape
        backend = "dense" if dispatch is None else resolve_moe_backend(self.backend, h, self.output_experts.w)
        o = self.output_experts
        y = expert_reduce(h.reshape(b * length, k, c), routing.gates, o.w, o.b, routing.topk_idx, backend, dispatch)
        return y.view(b, length, y.shape[-1])

    def extra_repr(self) -> str:  # noqa: D102
        return (f"num_experts={self.num_experts}, k={self.k}, num_tasks={self.num_tasks}, "
                f"noisy_gating={self.noisy_gating}, backend={self.backend!r}")  # fmt: skip
