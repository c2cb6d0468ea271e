"""The ``"numba"`` selective-scan backend: compiled CPU kernels for the forward and a hand-written backward.

Forward: one task per (batch, channel), spread over the cores with ``numba.prange``; each task walks L in chunks of
:data:`CHUNK` steps (or one chunk of L when shorter). Per chunk, the pointwise work (softplus, the gate) runs as
separate loops that LLVM vectorises, and only the recurrence h_t = a_t·h_{t-1} + Δ_t·B_t·u_t is sequential. The state
at the start of every chunk is saved, (batch, dim, ⌈L/chunk⌉, N) in all, instead of an O(batch·dim·L·N)
activation.

Backward (``docs/ops/selective_scan.md``, "Gradient"): per task, the chunks are visited last to first; each chunk's
states are recomputed from its saved start state, then the adjoint λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} runs in reverse.
A task owns a block of channels of one batch element that lies inside a single group of every variable B / C, so it
alone writes its slot of the partial dB / dC / dA / dD / ddelta_bias buffers; the slots are summed afterwards (no data
races).

Several states (N > 1, Mamba-LM) run the kernels of :mod:`visionkit.ops.selective_scan.numba_multi_state`, vectorised
over the N states of a step (a contiguous row of a per-task (chunk, N) scratch array). A single state (N = 1, VMamba)
runs those of :mod:`visionkit.ops.selective_scan.numba_single_state`: a task takes a block of channels (forward: any
block; backward: the block above) and walks them four at a time, interleaving the four scalar recurrences of each
chunk so that their latency overlaps, with every pointwise part a vectorised loop over time. Both take their
arguments as the records of :mod:`visionkit.ops.selective_scan.numba_support`, which also writes out exp and log1p
for float32 (numba's libm calls do not vectorise).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from visionkit.ops.selective_scan.inputs import ScanInputs, ScanOutput, compute_dtype
from visionkit.ops.selective_scan.kernel import Grads, run_scan_kernel
from visionkit.ops.selective_scan.numba_multi_state import backward_kernel, forward_kernel
from visionkit.ops.selective_scan.numba_single_state import backward_kernel_n1, forward_kernel_n1
from visionkit.ops.selective_scan.numba_support import GradArrays, KernelConfig, ScanArrays

try:
    import numba

    _NUMBA_ERROR: str | None = None
except Exception as exc:  # missing or broken numba: importing this module must still work
    numba = None
    _NUMBA_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["CHUNK", "run_numba"]

#: Steps per chunk: one saved state per chunk; the backward keeps (CHUNK + 1)·N recomputed states per task. The
#: backward visits chunks last to first; long chunks keep its reads of (batch, dim, L) inputs ascending within a chunk
#: so that the hardware prefetcher hides memory latency (64-step chunks made the N = 1 backward ~2x slower).
CHUNK = 1024


def _kernel_bc(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """(dim, N) → (1, dim, 1, N); (batch, G, N, L) → (batch, G, L, N); contiguous, in ``dtype``."""
    if t.dim() == 2:
        return t.detach().to(dtype).reshape(1, t.shape[0], 1, t.shape[1]).contiguous().numpy()
    return t.detach().to(dtype).transpose(2, 3).contiguous().numpy()


def _arrays(inputs: ScanInputs, dtype: torch.dtype) -> ScanArrays:
    """The kernels' ``ins``: numpy views in ``dtype`` (absent D / delta_bias are zeros, an absent z is empty)."""
    dim = inputs.u.shape[1]

    def arr(t: Tensor | None, empty_shape: tuple[int, ...]) -> np.ndarray:
        if t is None:
            t = torch.zeros(empty_shape, dtype=dtype)
        return t.detach().to(dtype).contiguous().numpy()

    return ScanArrays(
        u=arr(inputs.u, ()),
        delta=arr(inputs.delta, ()),
        A=arr(inputs.A, ()),
        B=_kernel_bc(inputs.B, dtype),
        C=_kernel_bc(inputs.C, dtype),
        D=arr(inputs.D, (dim,)),
        z=arr(inputs.z, (0, 0, 0)),
        delta_bias=arr(inputs.delta_bias, (dim,)),
    )


def _drop_n(arrays: ScanArrays) -> ScanArrays:
    """The kernel inputs for N = 1 with B / C as (batch or 1, G, L or 1) (views; drops their size-1 N axis)."""
    return arrays._replace(B=arrays.B[..., 0], C=arrays.C[..., 0])


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


def _config(inputs: ScanInputs, chunk: int, block: int, slot_div_b: int, slot_div_c: int) -> KernelConfig:
    """The kernels' settings for ``inputs`` (the slot divisors matter only to the backward)."""
    return KernelConfig(
        softplus=bool(inputs.delta_softplus),
        has_z=inputs.z is not None,
        chunk=chunk,
        block=block,
        slot_div_b=slot_div_b,
        slot_div_c=slot_div_c,
    )


class _NumbaScanKernel:
    """The :class:`~visionkit.ops.selective_scan.kernel.ScanKernel` of the numba backend."""

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Run the forward kernel; saves the chunk start states (batch, dim, ⌈L/CHUNK⌉, N) and CHUNK."""
        u = inputs.u
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = inputs.A.shape[1]
        chunk = max(1, min(CHUNK, length))  # one chunk of exactly L steps for short sequences
        out = torch.empty((batch, dim, length), dtype=dtype)
        states = torch.empty((batch, dim, -(-length // chunk), n), dtype=dtype)
        last = torch.empty((batch, dim, n), dtype=dtype)
        arrays = _arrays(inputs, dtype)
        cfg = _config(inputs, chunk, _channel_block(batch, dim, []), 1, 1)
        if n == 1:
            forward_kernel_n1(_drop_n(arrays), cfg, (out.numpy(), states.numpy()[..., 0], last.numpy()[..., 0]))
        else:
            forward_kernel(arrays, cfg, out.numpy(), states.numpy(), last.numpy())
        return out.to(u.dtype), last, (states, torch.tensor(chunk))

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Run the backward kernel and reduce its partial sums; gradients in the compute dtype."""
        u, B, C = inputs.u, inputs.B, inputs.C
        states, chunk = saved
        dtype = compute_dtype(u)
        batch, dim, length = u.shape
        n = inputs.A.shape[1]
        block = _channel_block(batch, dim, [t.shape[1] for t in (B, C) if t.dim() == 4])

        def partial(t: Tensor) -> tuple[Tensor, int]:  # buffer and slot divisor of a B / C gradient
            if t.dim() == 2:
                return torch.zeros((batch, dim, 1, n), dtype=dtype), 1
            return torch.zeros((batch, dim // block, length, n), dtype=dtype), block

        dB_part, div_b = partial(B)
        dC_part, div_c = partial(C)
        du = torch.empty((batch, dim, length), dtype=dtype)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if inputs.z is not None else torch.empty((0, 0, 0), dtype=dtype)
        dA_part = torch.empty((batch, dim, n), dtype=dtype)
        dD_part = torch.empty((batch, dim), dtype=dtype)
        dbias_part = torch.empty((batch, dim), dtype=dtype)
        arrays = _arrays(inputs, dtype)
        grads = GradArrays(
            du=du.numpy(),
            ddelta=ddelta.numpy(),
            dz=dz.numpy(),
            dA=dA_part.numpy(),
            dB=dB_part.numpy(),
            dC=dC_part.numpy(),
            dD=dD_part.numpy(),
            ddelta_bias=dbias_part.numpy(),
        )
        dout_np = dout.detach().to(dtype).numpy()
        cfg = _config(inputs, int(chunk), block, div_b, div_c)
        if n == 1:
            grads = grads._replace(dA=grads.dA[..., 0], dB=grads.dB[..., 0], dC=grads.dC[..., 0])
            backward_kernel_n1(_drop_n(arrays), cfg, states.detach().numpy()[..., 0], dout_np, grads)
        else:
            backward_kernel(arrays, cfg, states.detach().numpy(), dout_np, grads)

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
            dD_part.sum(0) if inputs.D is not None else None,
            dz if inputs.z is not None else None,
            dbias_part.sum(0) if inputs.delta_bias is not None else None,
        )


_KERNEL = _NumbaScanKernel()


def run_numba(inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
    """The numba scan of validated CPU inputs (the backend table's runner of ``"numba"``), differentiable in all eight.

    fp16 / bf16 / fp32 inputs are computed in float32, float64 in float64.

    Args:
        inputs: The call's inputs, already validated, on the CPU.
        return_last_state: Also return the final state h_L, (batch, dim, N) in the compute dtype.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.

    Raises:
        RuntimeError: numba does not import.
    """
    if numba is None:
        raise RuntimeError(f"the numba selective-scan backend needs numba, which does not import ({_NUMBA_ERROR})")
    return run_scan_kernel(_KERNEL, inputs, return_last_state)
