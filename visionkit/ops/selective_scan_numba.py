"""The ``"numba"`` selective-scan backend: compiled CPU kernels for the forward and a hand-written backward.

Forward: one task per (batch, channel), spread over the cores with ``numba.prange``; each task walks L in chunks of
:data:`CHUNK` steps (or one chunk of L when shorter). Per chunk, the pointwise work (softplus, the gate) runs as
separate loops that LLVM vectorises, and only the recurrence h_t = a_t·h_{t-1} + Δ_t·B_t·u_t is sequential. The state
at the start of every chunk is saved, (batch, dim, ⌈L/chunk⌉, N) in all, instead of an O(batch·dim·L·N)
activation.

Backward (``shared/reference/mamba.md`` §3): per task, the chunks are visited last to first; each chunk's states are
recomputed from its saved start state, then the adjoint λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} runs in reverse. A task owns
a block of channels of one batch element that lies inside a single group of every variable B / C, so it alone writes
its slot of the partial dB / dC / dA / dD / ddelta_bias buffers; the slots are summed afterwards (no data races).

Several states (N > 1, Mamba-LM) run the kernels of :mod:`visionkit.ops.selective_scan_numba_multi_state`, vectorised
over the N states of a step (a contiguous row of a per-task (chunk, N) scratch array). A single state (N = 1, VMamba)
runs those of :mod:`visionkit.ops.selective_scan_numba_single_state`: a task takes a block of channels (forward: any
block; backward: the block above) and walks them four at a time, interleaving the four scalar recurrences of each
chunk so that their latency overlaps, with every pointwise part a vectorised loop over time.

exp and log1p are written out for float32 in :mod:`visionkit.ops._numba_math` (numba's libm calls do not vectorise).
numba's on-disk cache does not track imports: a kernel compiled from one file keeps the helpers it inlined from another,
so after editing ``_numba_math.py`` also touch the kernel modules (or delete ``visionkit/ops/__pycache__``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from visionkit.ops._scan_inputs import Grads, ScanInputs, compute_dtype, run_scan_kernel
from visionkit.ops.selective_scan_numba_multi_state import backward_kernel, forward_kernel
from visionkit.ops.selective_scan_numba_single_state import backward_kernel_n1, forward_kernel_n1

try:
    import numba

    _NUMBA_ERROR: str | None = None
except Exception as exc:  # missing or broken numba: importing this module must still work
    numba = None
    _NUMBA_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["CHUNK", "selective_scan_numba"]

#: Steps per chunk: one saved state per chunk; the backward keeps (CHUNK + 1)·N recomputed states per task. The
#: backward visits chunks last to first; long chunks keep its reads of (batch, dim, L) inputs ascending within a chunk
#: so that the hardware prefetcher hides memory latency (64-step chunks made the N = 1 backward ~2x slower).
CHUNK = 1024


def _require_numba() -> None:
    if numba is None:
        raise RuntimeError(f"the numba selective-scan backend needs numba, which does not import ({_NUMBA_ERROR})")


def _kernel_bc(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(dim, N) → (1, dim, 1, N); (batch, G, N, L) → (batch, G, L, N); contiguous, in ``dtype``."""
    if t.dim() == 2:
        return t.detach().to(dtype).reshape(1, t.shape[0], 1, t.shape[1]).contiguous()
    return t.detach().to(dtype).transpose(2, 3).contiguous()


def _arrays(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    dtype: torch.dtype,
) -> tuple[np.ndarray, ...]:
    """The kernels' first eight arguments as numpy views in ``dtype`` (absent D / delta_bias are zeros, z is empty)."""
    dim = u.shape[1]

    def arr(t: Tensor | None, empty_shape: tuple[int, ...]) -> np.ndarray:
        if t is None:
            t = torch.zeros(empty_shape, dtype=dtype)
        return t.detach().to(dtype).contiguous().numpy()

    return (
        arr(u, ()),
        arr(delta, ()),
        arr(A, ()),
        _kernel_bc(B, dtype).numpy(),
        _kernel_bc(C, dtype).numpy(),
        arr(D, (dim,)),
        arr(z, (0, 0, 0)),
        arr(delta_bias, (dim,)),
    )


def _drop_n(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The kernel inputs for N = 1 with B / C as (batch or 1, G, L or 1) (views; drops their size-1 N axis)."""
    return (*arrays[:3], arrays[3][..., 0], arrays[4][..., 0], *arrays[5:])


def _channel_block(batch: int, dim: int, variable_groups: list[int]) -> int:
    """Channels per backward task: divides dim / G of every variable B / C and gives >= 4 tasks per thread."""
    g = dim
    for groups in variable_groups:
        g = math.gcd(g, dim // groups)
    if g == 0:
        return 1
    target = 4 * numba.get_num_threads()
    for block in range(g, 0, -1):
        if g % block == 0 and batch * (dim // block) >= target:
            return block
    return 1


class _NumbaScanKernel:
    """The :class:`visionkit.ops._scan_inputs.ScanKernel` of the numba backend."""

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Run the forward kernel; saves the chunk start states (batch, dim, ⌈L/CHUNK⌉, N) and CHUNK."""
        u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
        _require_numba()
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = A.shape[1]
        chunk = max(1, min(CHUNK, length))  # one chunk of exactly L steps for short sequences
        out = torch.empty((batch, dim, length), dtype=dtype)
        states = torch.empty((batch, dim, -(-length // chunk), n), dtype=dtype)
        last = torch.empty((batch, dim, n), dtype=dtype)
        arrays = _arrays(u, delta, A, B, C, D, z, delta_bias, dtype)
        flags = (bool(delta_softplus), z is not None, chunk)
        if n == 1:
            outs = (out.numpy(), states.numpy()[..., 0], last.numpy()[..., 0])
            forward_kernel_n1(_drop_n(arrays), *flags, _channel_block(batch, dim, []), outs)
        else:
            forward_kernel(arrays, *flags, out.numpy(), states.numpy(), last.numpy())
        return out.to(u.dtype), last, (states, torch.tensor(chunk))

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Run the backward kernel and reduce its partial sums; gradients in the compute dtype."""
        u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
        _require_numba()
        states, chunk = saved
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = A.shape[1]
        block = _channel_block(batch, dim, [t.shape[1] for t in (B, C) if t.dim() == 4])

        def partial(t: Tensor) -> tuple[Tensor, int]:  # buffer and slot divisor of a B / C gradient
            if t.dim() == 2:
                return torch.zeros((batch, dim, 1, n), dtype=dtype), 1
            return torch.zeros((batch, dim // block, length, n), dtype=dtype), block

        dB_part, div_b = partial(B)
        dC_part, div_c = partial(C)
        du = torch.empty((batch, dim, length), dtype=dtype)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if z is not None else torch.empty((0, 0, 0), dtype=dtype)
        dA_part = torch.empty((batch, dim, n), dtype=dtype)
        dD_part = torch.empty((batch, dim), dtype=dtype)
        dbias_part = torch.empty((batch, dim), dtype=dtype)
        arrays = _arrays(u, delta, A, B, C, D, z, delta_bias, dtype)
        grads = tuple(t.numpy() for t in (du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part))
        dout_np = dout.detach().to(dtype).numpy()
        flags = (bool(delta_softplus), z is not None, int(chunk))
        blocking = (block, div_b, div_c)
        if n == 1:
            grads = tuple(g[..., 0] if i in (3, 4, 5) else g for i, g in enumerate(grads))
            backward_kernel_n1(_drop_n(arrays), *flags, states.detach().numpy()[..., 0], dout_np, blocking, grads)
        else:
            backward_kernel(arrays, *flags, states.detach().numpy(), dout_np, blocking, grads)

        def reduce_bc(part: Tensor, t: Tensor) -> Tensor:
            if t.dim() == 2:  # (batch, dim, 1, N) → (dim, N)
                return part.sum(0).reshape(dim, n)
            groups = t.shape[1]  # blocks of one group are adjacent slots
            return part.reshape(batch, groups, part.shape[1] // groups, length, n).sum(2).transpose(2, 3).contiguous()

        return (
            du,
            ddelta,
            dA_part.sum(0),
            reduce_bc(dB_part, B),
            reduce_bc(dC_part, C),
            dD_part.sum(0) if D is not None else None,
            dz if z is not None else None,
            dbias_part.sum(0) if delta_bias is not None else None,
        )


_KERNEL = _NumbaScanKernel()


def selective_scan_numba(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with compiled CPU kernels (the ``"numba"`` backend), differentiable in all eight inputs.

    Same arguments, semantics and outputs as :func:`visionkit.ops.selective_scan_reference`: fp16 / bf16 / fp32 inputs
    are computed in float32, float64 in float64.

    Args:
        u: Input sequence, (batch, dim, L), on the CPU.
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real.
        B: Input matrix, (dim, N), (batch, N, L) or (batch, G, N, L) with dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,).
        z: Optional gate, (batch, dim, L).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L, (batch, dim, N).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with last_state in the compute dtype.

    Raises:
        RuntimeError: numba does not import, or the tensors are not on the CPU.
        ValueError: On a bad shape (the message names the argument).
    """
    _require_numba()
    if u.device.type != "cpu":
        raise RuntimeError(f"the numba selective-scan backend runs on CPU tensors, got {u.device.type} tensors")
    return run_scan_kernel(_KERNEL, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
