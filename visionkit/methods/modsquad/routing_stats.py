"""Per-layer routing statistics: the mutual-information window and the usage EMA (``docs/methods/modsquad.md``).

One :class:`RoutingStats` per MoE layer (``TaskMoE`` / ``MoAttention``), fed by the layer's routing hook. It keeps

- the **window** (training forwards since the last :meth:`RoutingStats.loss`): soft joint table ``S[t, e]`` (sum of
  the router probabilities, with gradient), hard counts ``C[t, e]`` (top-k membership), and for the z-loss the summed
  squared log-partition; the loss all-reduces them across ranks (differentiably) and clears the window;
- the **usage EMA** ``usage_ema[t, e]`` (buffer, saved in checkpoints): per task, ``0.95 · old + 0.05 · counts of the
  window`` for every task seen in the window (the release's ``task_gate_freq``, which is per forward; one forward per
  task per step makes the two equal). Extraction reads it.

:func:`attach_routing_stats` registers the stats **as a child module of each MoE layer** (``<layer>.routing_stats``),
so the EMA travels with the model: ``state_dict``, ``deepcopy``, ``.to(device)`` and checkpoint loading work without
the training module or a callback. Checkpoints without the statistics (the released weights) still load strictly.

Call :func:`mutual_information_total` (or each ``loss()``) exactly once per training step on every rank, also with a
zero weight: it is the collective, commits the usage EMA and frees the window's graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from visionkit.methods.modsquad.losses import mutual_information_loss, switch_loss, z_loss
from visionkit.utils.distributed import get_world_size

if TYPE_CHECKING:
    from visionkit.models.layers.task_moe import Routing

__all__ = [
    "RoutingStats",
    "attach_routing_stats",
    "detach_routing_stats",
    "find_routing_stats",
    "moe_layers",
    "mutual_information_total",
]


class RoutingStats(nn.Module):
    """Routing statistics of one MoE layer over ``num_tasks`` tasks and ``num_experts`` experts.

    Args:
        num_tasks: Routers (tasks) of the layer, ``T``.
        num_experts: Experts of the layer, ``E``.
        k: Experts per token (top-k); the routed token count is ``Σ counts / k`` as released.
        ema: Weight of the old value in the usage EMA (released 0.95).
        sync_across_ranks: All-reduce the window over ranks before the loss (differentiable). The release does not;
            with one task per rank its MI would be 0. Without it, DDP's buffer broadcast also overwrites every
            rank's EMA with rank 0's.
        track_z: Also accumulate the z-loss statistic (costs a logsumexp over the logits per forward).
        track_eval: Count eval-mode forwards in the usage EMA (committed by the next :meth:`loss` or
            :meth:`commit_usage`); by default only training forwards are counted. Eval forwards never enter the loss.
    """

    usage_ema: Tensor

    def __init__(
        self,
        num_tasks: int,
        num_experts: int,
        k: int,
        ema: float = 0.95,
        sync_across_ranks: bool = True,
        track_z: bool = False,
        track_eval: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < k <= num_experts:
            raise ValueError(f"need 0 < k <= num_experts, got k={k}, num_experts={num_experts}")
        self.num_tasks, self.num_experts, self.k = num_tasks, num_experts, k
        self.ema, self.sync_across_ranks = ema, sync_across_ranks
        self.track_z, self.track_eval = track_z, track_eval
        self.register_buffer("usage_ema", torch.zeros(num_tasks, num_experts))
        self.handle: RemovableHandle | None = None
        self.reset()

    def extra_repr(self) -> str:
        """Sizes and EMA weight, for ``print(model)``."""
        return f"num_tasks={self.num_tasks}, num_experts={self.num_experts}, k={self.k}, ema={self.ema}"

    def reset(self) -> None:
        """Clear the window and the pending usage counts (the EMA is kept)."""
        self._rows: list[list[Tensor]] = [[] for _ in range(self.num_tasks)]
        self._counts: Tensor | None = None  # (T, E) training window
        self._pending: Tensor | None = None  # (T, E) counts not yet in the EMA
        self._z_sum: Tensor | None = None
        self._z_tokens = 0

    def hook(self, module: nn.Module, routing: Routing) -> None:
        """The routing hook: :meth:`update` with the layer's training mode."""
        self.update(routing, training=module.training)

    @torch.compiler.disable
    def update(self, routing: Routing, training: bool = True) -> None:
        """Add one forward's routing of one task to the window.

        Args:
            routing: The layer's routing: ``task``, ``probs`` ``(N, E_t)``, ``topk_idx`` ``(N, k)``, ``logits``
                ``(N, E_t)``. A router may address only the first ``E_t <= E`` experts (tasks added by
                ``add_task`` address more experts than older ones); its row is zero-padded.
            training: Training forward (enters the loss window) or eval forward (usage only, if ``track_eval``).
        """
        if not training and not self.track_eval:
            return
        task, probs = routing.task, routing.probs
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")
        flat = routing.topk_idx.reshape(-1).long()
        # scatter_add_, not bincount: bincount reads its maximum back to the host on CUDA
        counts = torch.zeros(self.num_experts, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat).float())
        if self._pending is None:
            self._pending = torch.zeros(self.num_tasks, self.num_experts, device=probs.device)
        self._pending[task] += counts
        if not training:
            return
        if self._counts is None:
            self._counts = torch.zeros(self.num_tasks, self.num_experts, device=probs.device)
        self._counts[task] += counts
        row = probs.float().sum(dim=0)
        self._rows[task].append(nn.functional.pad(row, (0, self.num_experts - row.shape[0])))
        if self.track_z:
            self._z_sum = z_loss(routing.logits.float(), reduction="sum") + (0 if self._z_sum is None else self._z_sum)
            self._z_tokens += probs.shape[0]

    def _device(self) -> torch.device:
        for tensor in (self._counts, self._pending):
            if tensor is not None:
                return tensor.device
        return self.usage_ema.device

    def pack(self) -> Tensor:
        """The window as one flat float32 vector ``[S (T·E), C (T·E), z_sum, z_tokens, pending (T·E)]``."""
        device, shape = self._device(), (self.num_tasks, self.num_experts)
        zeros = torch.zeros(self.num_experts, device=device)
        joint = torch.stack([torch.stack(rows).sum(0) if rows else zeros for rows in self._rows])
        counts = self._counts if self._counts is not None else torch.zeros(shape, device=device)
        pending = self._pending if self._pending is not None else torch.zeros(shape, device=device)
        z_sum = self._z_sum if self._z_sum is not None else torch.zeros((), device=device)
        z_tokens = torch.tensor(float(self._z_tokens), device=device)
        return torch.cat([joint.flatten(), counts.flatten(), z_sum.view(1), z_tokens.view(1), pending.flatten()])

    def packed_size(self) -> int:
        """Length of :meth:`pack`'s vector."""
        return 3 * self.num_tasks * self.num_experts + 2

    def losses_from_packed(self, packed: Tensor, eps: float = 1e-4) -> dict[str, Tensor]:
        """Losses of a (reduced) packed window; commits its counts to the usage EMA and clears the window.

        Args:
            packed: :meth:`pack`'s vector, possibly summed over ranks.
            eps: The release's ``1e-4`` of the MI loss.

        Returns:
            ``{"mi", "switch", "z"}`` scalars (``z`` is 0 unless ``track_z``; all 0 for an empty window).
        """
        size = self.num_tasks * self.num_experts
        shape = (self.num_tasks, self.num_experts)
        joint, counts = packed[:size].view(shape), packed[size : 2 * size].view(shape)
        z_sum, z_tokens, pending = packed[2 * size], packed[2 * size + 1], packed[2 * size + 2 :].view(shape)
        # No branching on the values (a host sync per layer): an empty window gives exactly 0 for every term.
        out = {
            "mi": mutual_information_loss(joint, counts.sum() / self.k, eps),
            "switch": switch_loss(joint.sum(0), counts.sum(0)),
            "z": z_sum / z_tokens.clamp_min(1.0),
        }
        self._commit(pending.detach())
        self.reset()
        return out

    def losses(self, eps: float = 1e-4) -> dict[str, Tensor]:
        """MI, switch and z losses over the window (reduced across ranks when enabled); see :meth:`loss`."""
        return self.losses_from_packed(_reduce(self.pack(), self.sync_across_ranks), eps)

    def loss(self, eps: float = 1e-4) -> Tensor:
        """The mutual-information loss over the window, then the usage EMA update and a new window.

        With ``sync_across_ranks`` and more than one process, the window is summed over ranks first with a
        differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``): every rank gets the global loss,
        and the backward all-reduces the gradient too, so each rank's gradient w.r.t. its own routers' inputs is
        ``world_size ×`` the single-process one; DDP's mean over ranks makes it exactly the gradient of the global
        loss. Collective: every rank must call it, the same number of times.

        Args:
            eps: The release's ``1e-4``.

        Returns:
            Scalar (exactly 0 for an empty window).
        """
        return self.losses(eps)["mi"]

    @torch.no_grad()
    def commit_usage(self) -> None:
        """Move the pending (eval) counts into the usage EMA without computing a loss (collective when synced)."""
        size = self.num_tasks * self.num_experts
        device = self._device()
        pending = self._pending if self._pending is not None else torch.zeros(size, device=device)
        self._commit(_reduce(pending.flatten(), self.sync_across_ranks, differentiable=False).view_as(self.usage_ema))
        self._pending = None

    @torch.no_grad()
    def _commit(self, pending: Tensor) -> None:
        seen = pending.sum(dim=1) > 0
        mixed = self.usage_ema * self.ema + pending.to(self.usage_ema) * (1.0 - self.ema)
        self.usage_ema.copy_(torch.where(seen[:, None], mixed, self.usage_ema))

    def usage_percent(self) -> Tensor:
        """``(T, E)``: each task's share (%) of its routed slots per expert, from the EMA (rows of unseen tasks: 0)."""
        total = self.usage_ema.sum(dim=1, keepdim=True)
        return torch.where(total > 0, self.usage_ema / total.clamp_min(1e-12) * 100.0, torch.zeros_like(total))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The released checkpoints (and any saved before the stats were attached) have no usage: keep the current EMA.
        before = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        missing_keys[before:] = [key for key in missing_keys[before:] if not key.startswith(prefix)]


def _reduce(vector: Tensor, sync: bool, differentiable: bool = True) -> Tensor:
    if not sync or get_world_size() == 1:
        return vector
    if differentiable:
        return dist_fn.all_reduce(vector, op=dist.ReduceOp.SUM)
    vector = vector.clone()
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return vector


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The MoE layers of ``model``: the outermost modules with a ``register_routing_hook`` method, by module path.

    A routing module nested in another one (e.g. the query projection inside ``MoAttention``) is part of its parent's
    layer and not listed on its own.
    """
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "register_routing_hook", None)) and not any(
            name.startswith(parent + ".") or parent == "" for parent in layers
        ):
            layers[name] = module
    return layers


def attach_routing_stats(model: nn.Module, **kwargs: Any) -> dict[str, RoutingStats]:
    """Give every MoE layer of ``model`` a :class:`RoutingStats` child (``<layer>.routing_stats``) fed by its hook.

    Layers that already have one keep it unchanged (so calling this again, e.g. after loading a checkpoint, is safe).

    Args:
        model: Any module containing ``TaskMoE`` / ``MoAttention`` layers (attributes ``num_tasks``, ``num_experts``,
            ``k``; method ``register_routing_hook``).
        **kwargs: :class:`RoutingStats` options (``ema``, ``sync_across_ranks``, ``track_z``, ``track_eval``).

    Returns:
        The statistics by layer path (the path of the layer, not of the stats module).
    """
    stats: dict[str, RoutingStats] = {}
    for name, layer in moe_layers(model).items():
        existing = getattr(layer, "routing_stats", None)
        if isinstance(existing, RoutingStats):
            stats[name] = existing
            continue
        layer_stats = RoutingStats(layer.num_tasks, layer.num_experts, layer.k, **kwargs)
        layer_stats.to(_layer_device(layer))
        layer.routing_stats = layer_stats
        layer_stats.handle = layer.register_routing_hook(layer_stats.hook)
        stats[name] = layer_stats
    return stats


def detach_routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Remove every layer's :class:`RoutingStats` (hook and child module); returns them by layer path."""
    removed: dict[str, RoutingStats] = {}
    for name, layer in moe_layers(model).items():
        layer_stats = getattr(layer, "routing_stats", None)
        if isinstance(layer_stats, RoutingStats):
            if layer_stats.handle is not None:
                layer_stats.handle.remove()
                layer_stats.handle = None
            del layer.routing_stats
            removed[name] = layer_stats
    return removed


def find_routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """The attached :class:`RoutingStats` by layer path (layers without stats are skipped)."""
    return {
        name: layer.routing_stats
        for name, layer in moe_layers(model).items()
        if isinstance(getattr(layer, "routing_stats", None), RoutingStats)
    }


def mutual_information_total(
    stats: dict[str, RoutingStats] | nn.Module,
    weight: float = 0.005,
    switch_weight: float = 0.0,
    z_weight: float = 0.0,
    eps: float = 1e-4,
) -> Tensor:
    """``Σ_layers weight · L_MI (+ switch_weight · L_switch + z_weight · L_z)``, then new windows everywhere.

    The windows of all layers are reduced across ranks in one all-reduce (layers with ``sync_across_ranks=False``
    stay local). Collective under DDP: call it on every rank once per training step, also when every weight is 0.

    Args:
        stats: :func:`attach_routing_stats`'s dict, or a model to search with :func:`find_routing_stats`.
        weight: ``w_MI`` per layer (released 0.005; 0.0005, 0.03 and 1e-5 in other released configs).
        switch_weight: Switch-loss weight (0 in the released MI configs, 0.01 in the released MoE blocks).
        z_weight: z-loss weight (0 in the MI configs, 0.001 otherwise; needs ``track_z=True``).
        eps: The MI loss's ``1e-4``.

    Returns:
        Scalar.
    """
    layers = list((find_routing_stats(stats) if isinstance(stats, nn.Module) else stats).values())
    if not layers:
        raise ValueError("no RoutingStats: call attach_routing_stats(model) first")
    synced = [s for s in layers if s.sync_across_ranks]
    packed = {id(s): s.pack() for s in layers}
    if synced and get_world_size() > 1:
        flat = _reduce(torch.cat([packed[id(s)] for s in synced]), True)
        for layer_stats, part in zip(synced, flat.split([s.packed_size() for s in synced]), strict=True):
            packed[id(layer_stats)] = part
    total = torch.zeros((), device=layers[0]._device())
    for layer_stats in layers:
        losses = layer_stats.losses_from_packed(packed[id(layer_stats)], eps)
        total = total + weight * losses["mi"] + switch_weight * losses["switch"] + z_weight * losses["z"]
    return total


def _layer_device(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
