"""Per-task extraction, router-only tuning and continual learning of Mod-Squad models (``docs/methods/modsquad.md``).

Works on any module that holds MoE layers (``TaskMoE``, ``MoAttention``: found by their ``register_routing_hook``).
Each layer's experts live in an *expert holder*: the layer itself (``TaskMoE``) or its ``q_proj`` (``MoAttention``),
with ``experts.w`` ``(E, in, out)``, ``experts.b`` ``(E, out)``, ``output_experts.w/b`` and one router per task,
``f_gate[t][0]`` = ``Linear(dim, E_t)`` (``2·E_t`` rows with noisy gating: clean rows, then noise rows). A router may
address only the first ``E_t <= E`` experts (older tasks after :func:`add_task`).

Model-level attributes used when present (documented names, as in the release): ``task_embedding`` ``(1, T, D)``
parameter, ``task_names`` (list of ``T`` names), ``num_tasks`` (int), per-task heads ``task_heads`` (``ModuleList``
by task index or ``ModuleDict`` by task name). Usage comes from the layers' :class:`RoutingStats` children
(``<layer>.routing_stats.usage_ema``), i.e. from the model's own state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visionkit.methods.modsquad.routing_stats import RoutingStats, detach_routing_stats, find_routing_stats, moe_layers

__all__ = [
    "REMOVED_ROUTER_ATTR",
    "ExtractionReport",
    "LayerExtraction",
    "add_task",
    "expert_holder",
    "extract_layer",
    "extract_task_model",
    "freeze_for_router_tuning",
    "select_experts",
]

#: Attribute of the expert holder with the router rows of the experts removed by extraction (``keep_softmax_mass``).
REMOVED_ROUTER_ATTR = "removed_router"


@dataclass
class LayerExtraction:
    """One layer's extraction: the kept expert ids (ascending) out of ``total``."""

    kept: list[int]
    total: int


@dataclass
class ExtractionReport:
    """What :func:`extract_task_model` kept: per layer experts kept / total, and parameter counts."""

    task: str | int
    layers: dict[str, LayerExtraction] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        lines = [f"task {self.task!r}: {self.params_before:,} -> {self.params_after:,} parameters"]
        lines += [f"  {name}: {len(layer.kept)}/{layer.total} experts" for name, layer in self.layers.items()]
        return "\n".join(lines)


def expert_holder(layer: nn.Module) -> nn.Module:
    """The module holding ``experts``, ``output_experts`` and ``f_gate`` of an MoE layer (itself or ``q_proj``)."""
    for candidate in (layer, getattr(layer, "q_proj", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in ("experts", "output_experts", "f_gate")):
            return candidate
    raise TypeError(f"{type(layer).__name__} has no experts / output_experts / f_gate (nor a q_proj with them)")


def _router(holder: nn.Module, task: int) -> nn.Linear:
    return holder.f_gate[task][0]


def _is_noisy(layer: nn.Module, holder: nn.Module) -> bool:
    for module in (holder, layer):
        if hasattr(module, "noisy_gating"):
            return bool(module.noisy_gating)
    return _router(holder, 0).out_features == 2 * layer.num_experts


def _router_width(layer: nn.Module, holder: nn.Module, task: int) -> int:
    rows = _router(holder, task).out_features
    return rows // 2 if _is_noisy(layer, holder) else rows


def _set_count(modules: Sequence[nn.Module], name: str, value: int) -> None:
    """Set the plain attribute ``name`` where present (read-only properties, e.g. ``MoAttention``'s, delegate)."""
    for module in {id(m): m for m in modules}.values():
        if hasattr(module, name) and not isinstance(getattr(type(module), name, None), property):
            setattr(module, name, value)


def _set_num_experts(layer: nn.Module, holder: nn.Module, num_experts: int) -> None:
    _set_count((layer, holder, holder.experts, holder.output_experts), "num_experts", num_experts)


def _set_num_tasks(layer: nn.Module, holder: nn.Module, num_tasks: int) -> None:
    _set_count((layer, holder), "num_tasks", num_tasks)


def _expert_params(holder: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, name)`` of each per-expert parameter (dim 0 = expert): ``experts.w/b``, ``output_experts.w/b``."""
    return [
        (module, name)
        for module in (holder.experts, holder.output_experts)
        for name in ("w", "b")
        if isinstance(getattr(module, name, None), nn.Parameter)
    ]


def select_experts(usage_percent: Tensor, k: int, thresh: float = 3.0) -> Tensor:
    """Experts a task keeps: usage (%) above ``thresh / k``, at least the ``k`` most used (released rule).

    Args:
        usage_percent: ``(E_t,)`` the task's share (%) of its routed slots per expert.
        k: Experts per token (12 for ViT-B MoA, 4 for its MoE-MLP: thresholds 0.25 % and 0.75 % at ``thresh=3``).
        thresh: The release's ``--thresh`` (default 3).

    Returns:
        ``(E',)`` int64 expert ids in ascending order, ``E' >= k``.
    """
    keep = torch.nonzero(usage_percent > thresh / k).flatten()
    if keep.numel() < k:
        keep = torch.topk(usage_percent, k).indices
    return keep.sort().values.to(torch.long)


@torch.no_grad()
def extract_layer(layer: nn.Module, task: int, keep_idx: Tensor, keep_softmax_mass: bool = False) -> nn.Module:
    """Make ``layer`` (in place) a single-task layer with the experts ``keep_idx`` and ``task``'s router in slot 0.

    Args:
        layer: A ``TaskMoE`` or ``MoAttention``.
        task: The router (task index) to keep.
        keep_idx: ``(E',)`` ascending expert ids below the router's width, ``E' >= k``.
        keep_softmax_mass: Keep the removed experts' router rows as ``<holder>.removed_router`` (``Linear(dim, R)``)
            so that the layer's softmax still divides by their mass: the gates then equal the full model's whenever no
            selected expert was removed. ``False`` = released behaviour (softmax renormalised over the kept experts).

    Returns:
        ``layer``.
    """
    holder = expert_holder(layer)
    if keep_softmax_mass and not hasattr(holder, REMOVED_ROUTER_ATTR):
        raise NotImplementedError(
            f"{type(holder).__name__} has no {REMOVED_ROUTER_ATTR!r} attribute: its router cannot keep the removed "
            "experts' softmax mass (docs/methods/modsquad.md, extraction)"
        )
    width = _router_width(layer, holder, task)
    keep = keep_idx.to(torch.long).cpu()
    if keep.numel() < layer.k or keep.numel() == 0 or int(keep.max()) >= width:
        raise ValueError(f"keep_idx must hold >= k={layer.k} expert ids below {width}, got {keep.tolist()}")
    for module, name in _expert_params(holder):
        param = getattr(module, name)
        setattr(module, name, nn.Parameter(param[keep.to(param.device)].clone(), param.requires_grad))
    router = _router(holder, task)
    weight = router.weight
    rows = torch.cat([keep, keep + width]) if _is_noisy(layer, holder) else keep
    router.weight = nn.Parameter(weight[rows.to(weight.device)].clone(), weight.requires_grad)
    router.out_features = rows.numel()
    holder.f_gate = nn.ModuleList([holder.f_gate[task]])
    removed = torch.tensor(sorted(set(range(width)) - set(keep.tolist())), dtype=torch.long)
    extra: nn.Linear | None = None
    if keep_softmax_mass:
        # rows removed by an earlier extraction of this layer stay in the denominator too
        previous = getattr(holder, REMOVED_ROUTER_ATTR, None)
        rows_removed = [weight[removed.to(weight.device)]] + ([previous.weight] if previous is not None else [])
        removed_weight = torch.cat(rows_removed)
        if removed_weight.shape[0] > 0:
            extra = nn.Linear(weight.shape[1], removed_weight.shape[0], bias=False, device=weight.device)
            extra.weight.copy_(removed_weight)
            extra.to(weight.dtype).requires_grad_(False)
    if hasattr(holder, REMOVED_ROUTER_ATTR):
        setattr(holder, REMOVED_ROUTER_ATTR, extra)
    _set_num_experts(layer, holder, keep.numel())
    _set_num_tasks(layer, holder, 1)
    return layer


def _task_index(model: nn.Module, task: int | str) -> tuple[int, str | int]:
    names = list(getattr(model, "task_names", []) or [])
    if isinstance(task, str):
        if task not in names:
            raise KeyError(f"unknown task {task!r}; model.task_names = {names}")
        return names.index(task), task
    return task, names[task] if names else task


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _slice_task_attributes(model: nn.Module, index: int, name: str | int) -> None:
    embedding = getattr(model, "task_embedding", None)
    if isinstance(embedding, nn.Parameter):
        model.task_embedding = nn.Parameter(embedding.data[:, index : index + 1].clone(), embedding.requires_grad)
    if getattr(model, "task_names", None) is not None:
        model.task_names = [name]
    if isinstance(getattr(model, "num_tasks", None), int):
        model.num_tasks = 1
    heads = getattr(model, "task_heads", None)
    if isinstance(heads, nn.ModuleDict):
        model.task_heads = nn.ModuleDict({str(name): heads[str(name)]})
    elif isinstance(heads, nn.ModuleList):
        model.task_heads = nn.ModuleList([heads[index]])


def extract_task_model(
    model: nn.Module,
    task: int | str,
    thresh: float = 3.0,
    keep_softmax_mass: bool = False,
    usage: Mapping[str, Tensor] | None = None,
) -> tuple[nn.Module, ExtractionReport]:
    """A standalone single-task copy of ``model`` with only the experts ``task`` uses (``model`` is not modified).

    Per MoE layer, expert ``e`` is kept iff the task's usage ``> thresh / k`` % (at least the ``k`` most used); the
    kept experts' weights, the task's router rows (router slot 0), its ``task_embedding`` slice and head are copied.
    Top-k is unchanged, so the per-token FLOPs are the same; layers may keep different expert counts. With
    ``keep_softmax_mass=False`` (released) the sliced softmax renormalises over the kept experts, so gates grow and
    top-k may differ where a removed expert would have been selected; with ``True`` the outputs equal the full
    model's whenever no selected expert was removed (noiseless routers; the layer must honour ``removed_router``).

    Args:
        model: The multi-task model, with :class:`RoutingStats` attached (their usage EMA) or ``usage`` given.
        task: Task index or name (``model.task_names``).
        thresh: The release's ``--thresh``.
        keep_softmax_mass: See above.
        usage: Optional ``(T, E)`` usage (any scale, e.g. counts or %) per layer path, overriding the stats.

    Returns:
        ``(single_task_model, report)``; the copy carries fresh single-task stats (EMA row of the task, sliced) if the
        original had stats.

    Raises:
        ValueError: A layer has no usage for the task (never trained / no statistics).
    """
    index, name = _task_index(model, task)
    stats = find_routing_stats(model)
    new = copy.deepcopy(model)
    old_stats = detach_routing_stats(new)
    report = ExtractionReport(task=name, params_before=_parameter_count(model))
    for path, layer in moe_layers(new).items():
        holder = expert_holder(layer)
        width = _router_width(layer, holder, index)
        if usage is not None and path in usage:
            row = usage[path][index].float()
        elif path in stats:
            row = stats[path].usage_ema[index]
        else:
            raise ValueError(f"no usage statistics for layer {path!r}: attach_routing_stats and train, or pass usage")
        row = row[:width].cpu()
        if row.sum() <= 0:
            raise ValueError(f"layer {path!r} has no recorded usage for task {name!r}")
        keep = select_experts(row / row.sum() * 100.0, layer.k, thresh)
        total = layer.num_experts
        extract_layer(layer, index, keep, keep_softmax_mass)
        report.layers[path] = LayerExtraction(kept=keep.tolist(), total=total)
        if path in old_stats:
            _reattach(layer, old_stats[path], task_rows=[index], keep=keep)
    _slice_task_attributes(new, index, name)
    report.params_after = _parameter_count(new)
    return new, report


def _reattach(layer: nn.Module, old: RoutingStats, task_rows: Sequence[int] | None, keep: Tensor | None) -> None:
    """Attach new stats sized to the layer now, carrying the old EMA's ``task_rows`` × ``keep`` block (top-left)."""
    fresh = RoutingStats(
        layer.num_tasks, layer.num_experts, layer.k, old.ema, old.sync_across_ranks, old.track_z, old.track_eval
    ).to(old.usage_ema.device)
    block = old.usage_ema if task_rows is None else old.usage_ema[list(task_rows)]
    if keep is not None:
        block = block[:, keep.to(block.device)]
    fresh.usage_ema[: block.shape[0], : block.shape[1]] = block
    layer.routing_stats = fresh
    fresh.handle = layer.register_routing_hook(fresh.hook)


def freeze_for_router_tuning(model: nn.Module, train: Sequence[str] = ("f_gate", "norm", "head")) -> list[str]:
    """Train only the parameters whose name contains one of ``train`` (routers, norms, heads by default).

    Sets ``requires_grad`` on each parameter: the release's ``frozen()`` assigns ``requires_grad`` on modules, which
    freezes nothing but raw parameters (``pos_embed``, ``cls_token``).

    Args:
        model: Any module.
        train: Substrings of the dotted parameter names that stay trainable.

    Returns:
        The names of the trainable parameters.
    """
    trainable = []
    for name, param in model.named_parameters():
        keep = any(part in name for part in train)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def _freeze_leading(param: nn.Parameter, count: int, dim: int = 0) -> None:
    """Zero the gradient of the first ``count`` slices along ``dim`` (hooks are not saved with the model)."""
    mask = torch.ones(param.shape[dim], dtype=param.dtype, device=param.device)
    mask[:count] = 0
    mask = mask.view([-1 if d == dim else 1 for d in range(param.ndim)])
    param.register_hook(lambda grad: grad * mask.to(grad.dtype))


@torch.no_grad()
def add_task(
    model: nn.Module,
    name: str,
    new_experts_per_layer: int | Mapping[str, int],
    head: nn.Module | None = None,
    freeze_old: bool = True,
    init_std: float = 0.02,
) -> nn.Module:
    """Add a task in place: new experts per layer and a new router over old + new experts; old tasks unchanged.

    Old routers keep their width (they address the old experts only), so an old task's routing, experts and outputs
    stay bit-identical. The new router is zero-initialised (as released); new expert weights are truncated-normal
    (``init_std``), biases 0; the new task embedding is the mean of the old ones.

    With ``freeze_old`` every existing parameter stops training: separate ones by ``requires_grad_(False)``, the old
    rows of the shared expert tensors and of ``task_embedding`` by a gradient hook that zeroes them (so plain SGD /
    Adam leave them exact; exclude those tensors from decoupled weight decay, which moves even zero-gradient weights).

    Args:
        model: The multi-task model.
        name: The new task's name (appended to ``task_names``).
        new_experts_per_layer: ``M`` new experts for every MoE layer, or per layer path (missing layers: 0).
        head: The new task's head, appended to ``task_heads`` (or stored under ``name`` in a ``ModuleDict``).
        freeze_old: Freeze everything that existed before (see above).
        init_std: Standard deviation of the new expert weights.

    Returns:
        ``model``.

    Raises:
        ValueError: ``head`` is given but the model has no ``task_heads`` ``ModuleList`` / ``ModuleDict``.
    """
    if head is not None and not isinstance(getattr(model, "task_heads", None), nn.ModuleList | nn.ModuleDict):
        raise ValueError("head given but the model has no task_heads ModuleList / ModuleDict to hold it")
    old_params = list(model.parameters())
    old_stats = detach_routing_stats(model)
    for path, layer in moe_layers(model).items():
        holder = expert_holder(layer)
        extra = new_experts_per_layer if isinstance(new_experts_per_layer, int) else new_experts_per_layer.get(path, 0)
        old_experts, old_tasks = layer.num_experts, layer.num_tasks
        for module, pname in _expert_params(holder):
            param = getattr(module, pname)
            fresh = param.new_zeros((extra, *param.shape[1:]))
            if pname == "w":
                nn.init.trunc_normal_(fresh, std=init_std, a=-2 * init_std, b=2 * init_std)
            grown = nn.Parameter(torch.cat([param.detach(), fresh]), param.requires_grad)
            setattr(module, pname, grown)
            if freeze_old:
                _freeze_leading(grown, old_experts)
        reference = _router(holder, 0)
        rows = (2 if _is_noisy(layer, holder) else 1) * (old_experts + extra)
        router = nn.Linear(reference.in_features, rows, bias=False, device=reference.weight.device)
        nn.init.zeros_(router.weight)
        holder.f_gate.append(nn.Sequential(router.to(reference.weight.dtype)))
        _set_num_experts(layer, holder, old_experts + extra)
        _set_num_tasks(layer, holder, old_tasks + 1)
        if path in old_stats:
            _reattach(layer, old_stats[path], task_rows=None, keep=None)
    embedding = getattr(model, "task_embedding", None)
    if isinstance(embedding, nn.Parameter):
        grown = nn.Parameter(torch.cat([embedding.detach(), embedding.detach().mean(1, keepdim=True)], dim=1))
        model.task_embedding = grown
        if freeze_old:
            _freeze_leading(grown, embedding.shape[1], dim=1)
    if getattr(model, "task_names", None) is not None:
        model.task_names = [*model.task_names, name]
    if isinstance(getattr(model, "num_tasks", None), int):
        model.num_tasks += 1
    heads = getattr(model, "task_heads", None)
    if head is not None and isinstance(heads, nn.ModuleList):
        heads.append(head)
    elif head is not None and isinstance(heads, nn.ModuleDict):
        heads[name] = head
    if freeze_old:
        still_present = {id(p) for p in model.parameters()}  # grown tensors replaced their old parameters
        for param in old_params:
            if id(param) in still_present:
                param.requires_grad_(False)
    return model
