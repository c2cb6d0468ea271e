"""Dropless top-k mixture-of-experts: dispatch, per-expert linear maps and combine, without host syncs.

Every token goes to exactly ``k`` experts (no capacity, no dropping; an expert may receive no token). With ``N``
tokens, ``E`` experts and ``M = N·k`` routed rows:

1. :func:`moe_dispatch` sorts the flattened ``(N·k,)`` expert ids stably: ``order`` (slot positions ``n·k + j`` in
   expert order), ``token_index = order // k``, per-expert ``counts`` and their cumulative ``offsets``.
2. :func:`moe_gather` copies each token once per slot into expert order (``(M, D)``).
3. :func:`grouped_linear` applies expert ``e``'s ``(in, out)`` matrix (and bias) to its contiguous block of rows.
4. :func:`moe_combine` scales each row by its gate and sums a token's ``k`` rows; :func:`moe_unsort` instead puts
   rows back in slot order ``(N·k, out)`` (mixture-of-attention keeps the ``k`` heads apart).

Backends of the per-expert maps (``docs/ops/moe.md``, "Backends"):

* ``"loop"``: one ``torch.mm`` per expert into slices of one buffer, in an autograd Function (as the release's
  ``ParallelLinear``); ``counts.tolist()`` is a host sync (free on CPU), read once for forward and backward.
* ``"grouped_mm"``: one ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) call with device-side int32
  ``offsets``, inside an autograd Function whose backward makes the incoming gradient contiguous (the built-in
  backward rejects stride-0 gradients) and zeroes the weight gradient of experts without rows.
* ``"dense"``: every expert on every row, then each row keeps its own expert's output: E× the FLOPs, no sync.
  :func:`expert_map`, :func:`expert_reduce` and :func:`moe_mlp` take the dense path per token instead of per routed
  row (one ``(in, E·out)`` GEMM and a gather; a scatter and one ``(E·in, out)`` GEMM), E/k× the FLOPs and no sort.
* ``"auto"``: ``grouped_mm`` for bf16 on CUDA (SM >= 80, rows of 16-byte multiples), else ``loop``.

No function here calls ``.item()``, ``.tolist()`` or ``bool(tensor)`` except the ``loop`` backend; counts come from
``scatter_add_`` (``torch.bincount`` reads its maximum back to the host on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MOE_BACKENDS",
    "MoEBackend",
    "MoEDispatch",
    "expert_map",
    "expert_reduce",
    "grouped_linear",
    "moe_combine",
    "moe_dispatch",
    "moe_gather",
    "moe_mlp",
    "moe_sort",
    "moe_unsort",
    "resolve_moe_backend",
]

MoEBackend = Literal["auto", "loop", "grouped_mm", "dense"]
MOE_BACKENDS: tuple[str, ...] = ("auto", "loop", "grouped_mm", "dense")

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class MoEDispatch(NamedTuple):
    """Where the ``M = N·k`` routed rows of a top-k assignment go, all on the device of the expert ids.

    Attributes:
        order: ``(M,)`` int64 positions into the flattened ``(N·k,)`` top-k slots, sorted by expert (stable, so
            within an expert rows keep token order).
        token_index: ``(M,)`` int64 token of each sorted row (``order // k``).
        counts: ``(E,)`` int64 rows per expert.
        offsets: ``(E,)`` int32 cumulative ends of the experts' row blocks (``grouped_mm``'s ``offs``).
        expert_index: ``(M,)`` int64 expert of each sorted row (the sorted ids).
    """

    order: Tensor
    token_index: Tensor
    counts: Tensor
    offsets: Tensor
    expert_index: Tensor


def moe_dispatch(topk_idx: Tensor, num_experts: int) -> MoEDispatch:
    """Sort top-k slots by expert without reading anything back to the host.

    Args:
        topk_idx: ``(N, k)`` integer expert ids in ``[0, num_experts)`` (ids are not range-checked: that would sync).
        num_experts: Number of experts ``E``.

    Returns:
        The :class:`MoEDispatch` of the ``N·k`` slots.
    """
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be (N, k), got shape {tuple(topk_idx.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    k = max(topk_idx.shape[1], 1)
    flat = topk_idx.reshape(-1).long()
    expert_index, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = counts.cumsum(0).to(torch.int32)
    return MoEDispatch(order, order.div(k, rounding_mode="floor"), counts, offsets, expert_index)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on for ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_unavailable(x: Tensor, weight: Tensor, dtype: torch.dtype) -> str | None:
    if _GROUPED_MM is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (weight.shape[1] * itemsize) % 16 or (weight.shape[2] * itemsize) % 16:
        return f"grouped_mm needs rows of 16-byte multiples, got in/out features {tuple(weight.shape[1:])} in {dtype}"
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "grouped_mm needs a CUDA device with compute capability >= 8.0"
    return None


def resolve_moe_backend(backend: str, x: Tensor, weight: Tensor) -> str:
    """The backend that runs ``x`` through ``weight``: ``"auto"`` made concrete, a named one checked.

    Args:
        backend: One of :data:`MOE_BACKENDS`.
        x: Input rows ``(M, in)`` (device and, outside autocast, dtype decide ``"auto"``).
        weight: ``(E, in, out)`` expert weights.

    Returns:
        ``"loop"``, ``"grouped_mm"`` or ``"dense"``.

    Raises:
        ValueError: An unknown backend name.
        RuntimeError: ``"grouped_mm"`` requested where it cannot run (the message says why).
    """
    if backend not in MOE_BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}, expected one of {MOE_BACKENDS}")
    dtype = _compute_dtype(x)
    reason = _grouped_mm_unavailable(x, weight, dtype)
    if backend == "grouped_mm" and reason is not None:
        raise RuntimeError(f"MoE backend 'grouped_mm' is unavailable: {reason}")
    if backend != "auto":
        return backend
    # CPU: grouped_mm measured slower than the loop (docs/ops/moe.md, "Backends"); CUDA: bf16 is its supported dtype
    return "grouped_mm" if x.is_cuda and dtype == torch.bfloat16 and reason is None else "loop"


class _LoopMM(torch.autograd.Function):
    """One ``torch.mm`` per expert into slices of one output buffer, forward and backward (sizes read once)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, sizes: list[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        out = x.new_empty(x.shape[0], weight.shape[2])
        for e, (xe, oe) in enumerate(zip(x.split(sizes), out.split(sizes), strict=True)):
            torch.mm(xe, weight[e], out=oe)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = weight.new_empty(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x_parts = grad_x.split(sizes) if grad_x is not None else [None] * len(sizes)
        for e, (xe, ge, gxe) in enumerate(zip(x.split(sizes), grad.split(sizes), grad_x_parts, strict=True)):
            if gxe is not None:
                torch.mm(ge, weight[e].t(), out=gxe)
            if grad_w is not None:
                torch.mm(xe.t(), ge, out=grad_w[e])  # an expert without rows gets zeros (empty inner dimension)
        return grad_x, grad_w, None


class _GroupedMM(torch.autograd.Function):
    """``grouped_mm(x, weight, offs=offsets)`` with a backward that accepts any gradient layout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offsets, counts)
        return _GROUPED_MM(x, weight, offs=offsets)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, offsets, counts = ctx.saved_tensors
        grad = grad.contiguous()  # e.g. the stride-0 gradient of a sum, which grouped_mm rejects
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _GROUPED_MM(grad, weight.transpose(-2, -1), offs=offsets)
        if ctx.needs_input_grad[1]:
            grad_w = _GROUPED_MM(x.t(), grad, offs=offsets)
            # an expert without rows must get an exact zero, whatever the kernel leaves in its block
            grad_w = torch.where((counts > 0)[:, None, None], grad_w, 0)
        return grad_x, grad_w, None, None


def _all_experts(x: Tensor, weight: Tensor) -> Tensor:
    """Every expert on every row: ``(R, in)`` × ``(E, in, out)`` → ``(R, E, out)`` as one GEMM."""
    e, i, o = weight.shape
    return (x @ weight.permute(1, 0, 2).reshape(i, e * o)).view(x.shape[0], e, o)


def grouped_linear(
    x_sorted: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dispatch: MoEDispatch,
    backend: MoEBackend = "auto",
) -> Tensor:
    """Apply each expert's linear map to its block of expert-sorted rows.

    Args:
        x_sorted: ``(M, in)`` rows grouped by expert in expert order, ``dispatch.counts[e]`` rows for expert ``e``.
        weight: ``(E, in, out)`` expert matrices (row ``x`` maps to ``x @ weight[e]``).
        bias: ``(E, out)`` expert biases, or None.
        dispatch: The :class:`MoEDispatch` the rows were sorted with.
        backend: ``"auto"``, ``"loop"``, ``"grouped_mm"`` or ``"dense"`` (module docstring).

    Returns:
        ``(M, out)`` outputs in the same row order, in the matmul's dtype (the autocast dtype under autocast).
    """
    if x_sorted.ndim != 2 or weight.ndim != 3 or x_sorted.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x_sorted (M, in) and weight (E, in, out), got {tuple(x_sorted.shape)} and "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if dispatch.counts.shape[0] != weight.shape[0]:
        raise ValueError(f"dispatch has {dispatch.counts.shape[0]} experts, weight has {weight.shape[0]}")
    backend = resolve_moe_backend(backend, x_sorted, weight)
    if backend == "dense":
        y_all = _all_experts(x_sorted, weight)
        index = dispatch.expert_index[:, None, None].expand(-1, 1, weight.shape[2])
        y = y_all.gather(1, index).squeeze(1)
    elif x_sorted.shape[0] == 0:
        y = x_sorted @ weight[0]  # empty, but keeps the graph (zero gradients) where the kernels have no rows to split
    else:
        dtype = _compute_dtype(x_sorted)
        x_c, w_c = x_sorted.to(dtype).contiguous(), weight.to(dtype)
        if backend == "loop":
            y = _LoopMM.apply(x_c, w_c, dispatch.counts.tolist())
        else:
            y = _GroupedMM.apply(x_c, w_c, dispatch.offsets, dispatch.counts)
    if bias is not None:
        y = y + bias.to(y.dtype).index_select(0, dispatch.expert_index)
    return y


class _GatherRows(torch.autograd.Function):
    """``x[token_index]`` whose backward sums each token's ``k`` row gradients without atomics (deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, token_index: Tensor, order: Tensor) -> Tensor:
        ctx.save_for_backward(order)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (order,) = ctx.saved_tensors
        n, m = ctx.num_tokens, grad.shape[0]
        slots = grad.new_empty(m, *grad.shape[1:]).index_copy_(0, order, grad)
        return slots.view(n, m // max(n, 1), *grad.shape[1:]).sum(1), None, None


def moe_gather(x: Tensor, dispatch: MoEDispatch) -> Tensor:
    """Copy each token once per routed slot, in expert order.

    Args:
        x: ``(N, D)`` tokens.
        dispatch: The :class:`MoEDispatch` of the tokens' ``(N, k)`` expert ids.

    Returns:
        ``(N·k, D)`` rows; row ``m`` is token ``dispatch.token_index[m]``.
    """
    return _GatherRows.apply(x, dispatch.token_index, dispatch.order)


def moe_unsort(y_sorted: Tensor, dispatch: MoEDispatch) -> Tensor:
    """Put expert-ordered rows back in slot order.

    Args:
        y_sorted: ``(N·k, C)`` rows in expert order.
        dispatch: The :class:`MoEDispatch` they were sorted with.

    Returns:
        ``(N·k, C)``; row ``n·k + j`` is token ``n``'s output from its ``j``-th ranked expert (view as ``(N, k, C)``).
    """
    # index_copy (a permutation, every row written once): its backward is a gather, no atomics
    return y_sorted.new_empty(y_sorted.shape).index_copy(0, dispatch.order, y_sorted)


def moe_sort(y_slots: Tensor, dispatch: MoEDispatch) -> Tensor:
    """Put slot-ordered rows ``(N·k, C)`` (row ``n·k + j``: token n, rank j) in expert order (undoes ``moe_unsort``)."""
    return y_slots.index_select(0, dispatch.order)


def moe_combine(y_sorted: Tensor, gates: Tensor, dispatch: MoEDispatch, num_tokens: int) -> Tensor:
    """Gate-weighted sum of each token's ``k`` expert outputs.

    The rows go back to slot order (a permutation) and the ``k`` gated rows of a token are summed with a reduction,
    which is ``index_add_`` over ``token_index`` without atomics: deterministic, summed in float32 for bf16 inputs.

    Args:
        y_sorted: ``(N·k, C)`` expert outputs in expert order.
        gates: ``(N, k)`` gate of each slot.
        dispatch: The :class:`MoEDispatch` of the rows.
        num_tokens: ``N``.

    Returns:
        ``(N, C)`` in the promoted dtype of ``y_sorted`` and ``gates`` (float32 for bf16 rows with float32 gates).
    """
    n, k = gates.shape
    if n != num_tokens or y_sorted.shape[0] != n * k:
        raise ValueError(f"{num_tokens} tokens with gates {tuple(gates.shape)} do not match {y_sorted.shape[0]} rows")
    slots = moe_unsort(y_sorted, dispatch).view(n, k, y_sorted.shape[1])
    return (slots * gates[..., None]).sum(1)


def _dense_map(x: Tensor, weight: Tensor, bias: Tensor | None, topk_idx: Tensor) -> Tensor:
    n, k = topk_idx.shape
    y = _all_experts(x, weight).gather(1, topk_idx[..., None].expand(n, k, weight.shape[2]))
    return y if bias is None else y + bias.to(y.dtype)[topk_idx]


def _dense_reduce(h: Tensor, gates: Tensor, weight: Tensor, bias: Tensor | None, topk_idx: Tensor) -> Tensor:
    n, k, i = h.shape
    e = weight.shape[0]
    gated = h * gates[..., None]
    per_expert = gated.new_zeros(n, e, i).scatter(1, topk_idx[..., None].expand(n, k, i), gated)
    y = per_expert.view(n, e * i) @ weight.reshape(e * i, weight.shape[2])
    if bias is None:
        return y
    gates_full = gates.new_zeros(n, e).scatter(1, topk_idx, gates)
    return y + (gates_full @ bias.to(gates_full.dtype)).to(y.dtype)


def _ensure_dispatch(topk_idx: Tensor, weight: Tensor, dispatch: MoEDispatch | None) -> MoEDispatch:
    return dispatch if dispatch is not None else moe_dispatch(topk_idx, weight.shape[0])


def expert_map(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    topk_idx: Tensor,
    backend: MoEBackend = "auto",
    dispatch: MoEDispatch | None = None,
) -> Tensor:
    """Each token through each of its ``k`` experts, kept apart (the query map of mixture-of-attention).

    Args:
        x: ``(N, in)`` tokens.
        weight: ``(E, in, out)`` expert matrices.
        bias: ``(E, out)`` expert biases or None.
        topk_idx: ``(N, k)`` expert ids, column ``j`` = rank ``j``.
        backend: As in :func:`grouped_linear`; ``"dense"`` runs all experts per token (no sort).
        dispatch: ``moe_dispatch(topk_idx, E)`` if already made (sorted backends only).

    Returns:
        ``(N, k, out)``: ``[n, j] = x[n] @ weight[topk_idx[n, j]] + bias[topk_idx[n, j]]``.
    """
    n, k = topk_idx.shape
    backend = resolve_moe_backend(backend, x, weight)
    if backend == "dense":
        return _dense_map(x, weight, bias, topk_idx)
    dispatch = _ensure_dispatch(topk_idx, weight, dispatch)
    y = grouped_linear(moe_gather(x, dispatch), weight, bias, dispatch, backend)
    return moe_unsort(y, dispatch).view(n, k, y.shape[1])


def expert_reduce(
    h: Tensor,
    gates: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    topk_idx: Tensor,
    backend: MoEBackend = "auto",
    dispatch: MoEDispatch | None = None,
) -> Tensor:
    """Gate-weighted sum over a token's ``k`` slots of the slot's expert map (mixture-of-attention's output map).

    Args:
        h: ``(N, k, in)`` per-slot inputs, slot ``j`` belonging to expert ``topk_idx[n, j]``.
        gates: ``(N, k)`` gates.
        weight: ``(E, in, out)`` expert matrices.
        bias: ``(E, out)`` expert biases or None.
        topk_idx: ``(N, k)`` expert ids.
        backend: As in :func:`expert_map`.
        dispatch: ``moe_dispatch(topk_idx, E)`` if already made.

    Returns:
        ``(N, out)``: ``Σ_j gates[n, j] · (h[n, j] @ weight[e_nj] + bias[e_nj])``.
    """
    n, k = topk_idx.shape
    backend = resolve_moe_backend(backend, h, weight)
    if backend == "dense":
        return _dense_reduce(h, gates, weight, bias, topk_idx)
    dispatch = _ensure_dispatch(topk_idx, weight, dispatch)
    y = grouped_linear(moe_sort(h.reshape(n * k, h.shape[-1]), dispatch), weight, bias, dispatch, backend)
    return moe_combine(y, gates, dispatch, n)


def moe_mlp(
    x: Tensor,
    topk_idx: Tensor,
    gates: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: Callable[[Tensor], Tensor] | None = F.gelu,
    backend: MoEBackend = "auto",
    dispatch: MoEDispatch | None = None,
) -> Tensor:
    """Top-k MoE MLP: ``y[n] = Σ_j gates[n, j] · expert_{e_nj}(x[n])``, expert = Linear, activation, Linear.

    Args:
        x: ``(N, D)`` tokens.
        topk_idx: ``(N, k)`` expert ids.
        gates: ``(N, k)`` gates.
        w1: ``(E, D, H)`` first-layer weights.
        b1: ``(E, H)`` first-layer biases or None.
        w2: ``(E, H, D_out)`` second-layer weights.
        b2: ``(E, D_out)`` second-layer biases or None.
        activation: Applied to the hidden rows (None = identity).
        backend: As in :func:`expert_map` (sorted backends keep the rows in expert order between the two maps).
        dispatch: ``moe_dispatch(topk_idx, E)`` if already made.

    Returns:
        ``(N, D_out)``.
    """
    n = x.shape[0]
    act = activation if activation is not None else (lambda t: t)
    backend = resolve_moe_backend(backend, x, w1)
    if backend == "dense":
        return _dense_reduce(act(_dense_map(x, w1, b1, topk_idx)), gates, w2, b2, topk_idx)
    dispatch = _ensure_dispatch(topk_idx, w1, dispatch)
    h = act(grouped_linear(moe_gather(x, dispatch), w1, b1, dispatch, backend))
    return moe_combine(grouped_linear(h, w2, b2, dispatch, backend), gates, dispatch, n)
