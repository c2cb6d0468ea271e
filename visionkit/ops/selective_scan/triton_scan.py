"""The ``"triton"`` selective-scan backend: launch shapes, buffers and autograd around its Triton kernels.

The kernels are in :mod:`.triton_kernels`. Each call picks a launch shape (:func:`_tile_shape`: chunk length,
channels and warps per program, measured on an H100 with ``bench/selective_scan_gpu_tune.py``), allocates the saved
chunk states and the gradient buffers, launches the forward or backward kernel and reduces the per-program partial
sums. Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; that is how CI tests the kernels).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from visionkit.ops.selective_scan import triton_kernels
from visionkit.ops.selective_scan.inputs import ScanInputs, ScanOutput, compute_dtype
from visionkit.ops.selective_scan.kernel import Grads, run_scan_kernel

__all__ = ["run_triton"]

# Elements of one (channels × states × steps) tile; the tile shape is chosen per call by _tile_shape.
_TILE_ELEMENTS = 2048
# Longest chunk of a forward-only call (inference): long chunks mean few sequential steps per program, and the scan
# inside a chunk is log-depth. Calls that will be differentiated use at most 128 steps for N > 1: the backward kernel
# keeps about twice as many tiles live and was 1.5-2x slower with the long chunks on an H100 (docs/benchmarks.md); N = 1
# has its own measured launch shapes (_tile_shape).
_MAX_BLOCK_L = 512
_MAX_BLOCK_L_TRAINING = 128
# The backward's variable dB / dC go through per-program partial sums while that buffer is at most this many times the
# size of u, else through atomic adds (every program of a group adds to the same addresses: much slower on an H100).
_MAX_PARTIAL_RATIO = 8


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class _Tiles(NamedTuple):
    """Launch shape of one call: the chunk length shared by both kernels, and channels / warps per program of each."""

    block_l: int
    fwd_block_d: int
    fwd_warps: int
    bwd_block_d: int
    bwd_warps: int


def _tile_shape(
    batch: int, dim: int, n: int, length: int, dim_per_group: int, device: torch.device, training: bool
) -> _Tiles:
    """Pick the launch shape of a call.

    BLOCK_N covers all N states and BLOCK_L is as long as the tile allows (at most ``_MAX_BLOCK_L``, or
    ``_MAX_BLOCK_L_TRAINING`` when the backward will run: both kernels must use the same chunks); BLOCK_D fills the
    rest of the tile, is lowered until there are enough programs per SM, and divides the channels of one B/C group
    (so that a program's dB / dC partial sums belong to one group).
    """
    block_n = _next_power_of_2(n)
    if training and block_n == 1:
        # N = 1 (VMamba): the fastest launch shapes of bench/selective_scan_gpu_tune.py's sweep on an H100 at the
        # VMamba-S stage-1 (L 3136 and 4096) and stage-3 (L 196) shapes (docs/benchmarks.md, 2026-11-26)
        block_l, fwd_d, fwd_w, bwd_d, bwd_w = (256, 2, 4, 2, 2) if length >= 1024 else (32, 4, 1, 8, 2)
        fwd_d, bwd_d = (_largest_divisor_at_most(dim_per_group, d) for d in (fwd_d, bwd_d))
        return _Tiles(min(block_l, _MAX_BLOCK_L), fwd_d, fwd_w, bwd_d, bwd_w)
    max_block_l = min(_MAX_BLOCK_L, _MAX_BLOCK_L_TRAINING) if training else _MAX_BLOCK_L
    block_l = min(max(16, _next_power_of_2(length)), max(16, _TILE_ELEMENTS // (block_n * 4)), max_block_l)
    block_d = min(16, max(1, _TILE_ELEMENTS // (block_n * block_l)))
    if device.type == "cuda":
        sms = _multiprocessor_count(device)
        min_programs, min_block_d = (4 * sms, 4) if training else (2 * sms, 1)
        while block_d > min_block_d and batch * -(-dim // block_d) < min_programs:
            block_d //= 2
    block_d = _largest_divisor_at_most(dim_per_group, block_d)
    # 8 warps for the long N = 1 inference tiles (measured 0.14 vs 0.28 ms at the VMamba stage-1 shape on an H100;
    # docs/benchmarks.md); 4 elsewhere (8 was slower for the backward and for N = 16)
    warps = 8 if not training and block_n == 1 and block_d * block_l >= 2048 else 4
    return _Tiles(block_l, block_d, warps, block_d, warps)


def _largest_divisor_at_most(n: int, block: int) -> int:
    """Halve the power of two ``block`` until it divides ``n``."""
    while n % block:
        block //= 2
    return block


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class _TritonScanKernel:
    """:class:`~visionkit.ops.selective_scan.kernel.ScanKernel` running the kernels of :mod:`.triton_kernels`.

    Args:
        training: The call will be differentiated: use the chunk length that suits the backward kernel (the forward
            and the backward of one call must use the same chunks).
        tiles: Fixed launch shape for every call instead of :func:`_tile_shape`'s choice (for tuning; both BLOCK_D
            must divide the channels of one B / C group).
    """

    def __init__(self, training: bool, tiles: _Tiles | None = None) -> None:
        self.training = training
        self.tiles = tiles

    def _launch_args(
        self,
        inputs: ScanInputs,
        backward: bool,
    ) -> tuple[tuple[int, ...], dict, tuple[int, int]]:
        """Sizes (dim, L, N, G, n_chunks), compile-time arguments and grid of the forward or backward kernel."""
        u, A, B, C = inputs.u, inputs.A, inputs.B, inputs.C
        batch, dim, length = u.shape
        n = A.shape[1]
        groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
        for t in (B, C):
            if t.dim() == 4 and t.shape[1] != groups:
                # the kernel indexes one group count (mamba_ssm's CUDA kernel has the same restriction)
                raise ValueError(
                    f"the triton backend needs B and C with the same number of groups, got {B.shape} and {C.shape}"
                )
        tiles = self.tiles or _tile_shape(batch, dim, n, length, dim // groups, u.device, self.training)
        block_d, warps = (tiles.bwd_block_d, tiles.bwd_warps) if backward else (tiles.fwd_block_d, tiles.fwd_warps)
        n_chunks = -(-length // tiles.block_l)
        meta = {
            "HAS_D": inputs.D is not None,
            "HAS_Z": inputs.z is not None,
            "HAS_BIAS": inputs.delta_bias is not None,
            "SOFTPLUS": inputs.delta_softplus,
            "B_VAR": B.dim() == 4,
            "C_VAR": C.dim() == 4,
            "ACC": triton_kernels.tl.float64 if compute_dtype(u) == torch.float64 else triton_kernels.tl.float32,
            "BLOCK_D": block_d,
            "BLOCK_N": _next_power_of_2(n),
            "BLOCK_L": tiles.block_l,
            "num_warps": warps,
        }
        return (dim, length, n, groups, n_chunks), meta, (batch, -(-dim // block_d))

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Fused forward; see :class:`~visionkit.ops.selective_scan.kernel.ScanKernel`."""
        u, A = inputs.u, inputs.A
        sizes, meta, grid = self._launch_args(inputs, backward=False)
        batch, dim, length = u.shape
        n_chunks = sizes[4]
        acc_dtype = compute_dtype(u)
        out = torch.empty_like(u)
        states = torch.empty((batch, dim, max(n_chunks, 1), A.shape[1]), device=u.device, dtype=acc_dtype)
        last = torch.empty((batch, dim, A.shape[1]), device=u.device, dtype=acc_dtype)
        if length == 0:
            return out, last.zero_(), (states,)
        dummy = u  # placeholder pointer for absent optional inputs (never read: their constexpr flag is False)
        D, z, delta_bias = inputs.D, inputs.z, inputs.delta_bias
        triton_kernels.scan_fwd_kernel[grid](
            u, inputs.delta, A, inputs.B, inputs.C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, states, last, *sizes, **meta,
        )  # fmt: skip
        return out, last, (states,)

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Fused backward; see :class:`~visionkit.ops.selective_scan.kernel.ScanKernel`."""
        u, A, B, C, D, z, delta_bias = inputs.u, inputs.A, inputs.B, inputs.C, inputs.D, inputs.z, inputs.delta_bias
        (states,) = saved
        sizes, meta, grid = self._launch_args(inputs, backward=True)
        batch, dim, length = u.shape
        n = A.shape[1]
        acc_dtype = compute_dtype(u)
        groups, n_dblocks = sizes[3], grid[1]
        # per-program partial sums for variable dB / dC unless that buffer would be too large
        partial = batch * n_dblocks * n * length <= _MAX_PARTIAL_RATIO * u.numel()

        def bc_grad_buffer(m: Tensor) -> Tensor | None:
            if m.dim() == 2:
                return None  # time-invariant: rows of ``sums``
            shape = (batch, n_dblocks, n, length) if partial else m.shape
            return (torch.empty if partial else torch.zeros)(shape, device=u.device, dtype=acc_dtype)

        du, ddelta = torch.empty_like(u, dtype=acc_dtype), torch.empty_like(u, dtype=acc_dtype)
        dz = torch.empty_like(du) if z is not None else None
        # every program writes its columns of every row it uses; the rows of absent inputs are never read
        sums = (torch.zeros if length == 0 else torch.empty)((batch, 3 * n + 2, dim), device=u.device, dtype=acc_dtype)
        dB, dC = bc_grad_buffer(B), bc_grad_buffer(C)
        if length > 0:
            dummy = u
            triton_kernels.scan_bwd_kernel[grid](
                u, inputs.delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
                delta_bias if delta_bias is not None else dummy, states, dout,
                du, ddelta, dz if dz is not None else du, sums,
                dB if dB is not None else du, dC if dC is not None else du, *sizes, BC_PARTIAL=partial, **meta,
            )  # fmt: skip
        total = sums.sum(0) if batch > 1 else sums[0]  # (3N + 2, dim)

        def bc_grad(g: Tensor | None, row: int) -> Tensor:
            if g is None:  # time-invariant (dim, N)
                return total[row * n : (row + 1) * n].t()
            if partial:  # programs of one group are consecutive: (batch, G, blocks per group, N, L)
                return g.view(batch, groups, n_dblocks // groups, n, length).sum(2)
            return g

        return (
            du,
            ddelta,
            total[:n].t(),
            bc_grad(dB, 1),
            bc_grad(dC, 2),
            total[3 * n] if D is not None else None,
            dz,
            total[3 * n + 1] if delta_bias is not None else None,
        )


_TRAINING_KERNEL = _TritonScanKernel(training=True)
_INFERENCE_KERNEL = _TritonScanKernel(training=False)


def run_triton(inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
    """The fused Triton scan of validated inputs (the backend table's runner of ``"triton"``).

    Calls that will be differentiated (grad mode on and an input that requires grad) use the training launch shapes.

    Args:
        inputs: The call's inputs, already validated; CUDA tensors (or CPU under ``TRITON_INTERPRET=1``). Grouped B
            and C must have the same number of groups.
        return_last_state: Also return the final state h_L, (batch, dim, N).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.
    """
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs.tensors())
    kernel = _TRAINING_KERNEL if training else _INFERENCE_KERNEL
    return run_scan_kernel(kernel, inputs, return_last_state)
