"""The ``"triton"`` selective-scan backend: fused forward and backward GPU kernels.

One program per (batch, block of channels); it walks along L in chunks of ``BLOCK_L`` steps. Inside a chunk the
recurrence h_t = a_t·h_{t-1} + b_t is an inclusive ``tl.associative_scan`` of the pairs (a_t, b_t) under
(a0, b0)∘(a1, b1) = (a0·a1, a1·b0 + b1) on a (channels, states, steps) tile, and the state is carried from chunk to
chunk (``shared/reference/mamba.md`` §9). Everything around the scan is fused: delta bias and softplus, exp(Δ·A),
Δ·B·u, y = Σ_n C·h + D·u and the silu(z) gate. The forward saves the state at the end of every chunk
(batch, dim, n_chunks, N), like the CUDA kernel's ``x``; the backward walks the chunks from the end, recomputes the
states of a chunk from the saved one, runs the adjoint scan λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} in reverse, and forms every
gradient of mamba.md §3 in the same pass (dB / dC of variable B / C by atomic adds, the rest by per-program partial
sums reduced afterwards). Accumulation is fp32 (fp64 for fp64 inputs).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; that is how CI tests the kernels).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch import Tensor

from visionkit.ops._scan_inputs import Grads, ScanInputs, compute_dtype, run_scan_kernel

try:  # triton is optional at import time (e.g. CPU-only wheels); the dispatcher reports why it is unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["selective_scan_triton"]

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


if triton is not None:

    @triton.jit
    def _softplus(x):
        # torch.nn.functional.softplus with beta 1, threshold 20
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)

    @triton.jit
    def _combine(a0, b0, a1, b1):
        # (a0, b0) then (a1, b1): h -> a1·(a0·h + b0) + b1
        return a0 * a1, a1 * b0 + b1

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,  # inputs
        out_ptr, states_ptr, last_ptr,  # out (batch, dim, L); states (batch, dim, n_chunks, N) at each chunk end; h_L
        dim, length, n_state, groups, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        group = (pid_d * BLOCK_D) // (dim // groups)  # one group per program (BLOCK_D divides dim / groups)

        A = tl.load(a_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if not B_VAR:
            Bti = tl.load(b_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
        if not C_VAR:
            Cti = tl.load(c_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)

        row = (pid_b * dim + offs_d) * length  # (BLOCK_D,) start of each channel's sequence
        bc_row = (pid_b * groups + group) * n_state * length + offs_n * length  # (BLOCK_N,)
        state_row = (pid_b * dim + offs_d[:, None]) * n_chunks * n_state + offs_n[None, :]  # (BLOCK_D, BLOCK_N)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        for chunk in range(0, n_chunks):
            t = chunk * BLOCK_L + offs_l
            mask_l = t < length
            mask_dl = mask_d[:, None] & mask_l[None, :]
            idx = row[:, None] + t[None, :]
            u = tl.load(u_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            dt = tl.load(delta_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            if HAS_BIAS:
                dt += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(mask_dl, dt, 0.0)  # Δ = 0 past the end: a = 1, b = 0 keep the state for the last-state output
            mask_nl = mask_n[:, None] & mask_l[None, :]
            if B_VAR:
                Bt = tl.load(b_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Bt = Bti[:, :, None]
            if C_VAR:
                Ct = tl.load(c_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Ct = Cti[:, :, None]
            a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L); masked steps: exp(0) = 1
            b = (dt * u)[:, None, :] * Bt  # masked steps: 0, so padded steps leave the state unchanged
            a_cum, b_cum = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
            hs = b_cum + a_cum * h[:, :, None]
            y = tl.sum(hs * Ct, axis=1)  # (BLOCK_D, BLOCK_L)
            h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
            tl.store(states_ptr + state_row + chunk * n_state, h, mask=mask_dn)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(z_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
                y = y * zt * tl.sigmoid(zt)
            tl.store(out_ptr + idx, y, mask=mask_dl)
        tl.store(last_ptr + (pid_b * dim + offs_d[:, None]) * n_state + offs_n[None, :], h, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr,  # inputs
        du_ptr, ddelta_ptr, dz_ptr,  # (batch, dim, L)
        sums_ptr,  # per-batch partial sums (batch, 3N + 2, dim): rows dA, time-invariant dB, dC (N each), dD, dbias
        dbvar_ptr, dcvar_ptr,  # BC_PARTIAL: (batch, dim / BLOCK_D, N, L) per-program sums; else (batch, G, N, L)
        dim, length, n_state, groups, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_VAR: tl.constexpr, C_VAR: tl.constexpr, BC_PARTIAL: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        group = (pid_d * BLOCK_D) // (dim // groups)

        dn_idx = offs_d[:, None] * n_state + offs_n[None, :]
        A = tl.load(a_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if HAS_D:
            Dv = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
        if not B_VAR:
            Bti = tl.load(b_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)
        if not C_VAR:
            Cti = tl.load(c_ptr + dn_idx, mask=mask_dn, other=0.0).to(ACC)

        row = (pid_b * dim + offs_d) * length
        bc_row = (pid_b * groups + group) * n_state * length + offs_n * length
        state_row = (pid_b * dim + offs_d[:, None]) * n_chunks * n_state + offs_n[None, :]
        lam = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # λ at the first step of the chunk after the current one
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
        dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        for i in range(0, n_chunks):
            chunk = n_chunks - 1 - i
            t = chunk * BLOCK_L + offs_l
            mask_l = t < length
            mask_dl = mask_d[:, None] & mask_l[None, :]
            mask_nl = mask_n[:, None] & mask_l[None, :]
            idx = row[:, None] + t[None, :]
            u = tl.load(u_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            dt_raw = tl.load(delta_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            # Δ of the next step (t + 1), for the adjoint's decay a_{t+1}; 0 past the end gives a = 1 (λ_{L+1} = 0)
            mask_next = mask_d[:, None] & ((t + 1) < length)[None, :]
            dt_next = tl.load(delta_ptr + idx + 1, mask=mask_next, other=0.0).to(ACC)
            if HAS_BIAS:
                dt_raw += bias[:, None]
                dt_next += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt_raw)
                dt_next = _softplus(dt_next)
            else:
                dt = dt_raw
            dt = tl.where(mask_dl, dt, 0.0)
            if B_VAR:
                Bt = tl.load(b_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Bt = Bti[:, :, None]
            if C_VAR:
                Ct = tl.load(c_ptr + bc_row[:, None] + t[None, :], mask=mask_nl, other=0.0).to(ACC)[None, :, :]
            else:
                Ct = Cti[:, :, None]

            # recompute the states of this chunk from the state saved at the end of the previous one
            if chunk > 0:
                h0 = tl.load(states_ptr + state_row + (chunk - 1) * n_state, mask=mask_dn, other=0.0).to(ACC)
            else:
                h0 = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
            a = tl.exp(dt[:, None, :] * A[:, :, None])
            bu = (dt * u)[:, None, :] * Bt
            a_cum, b_cum = tl.associative_scan((a, bu), axis=2, combine_fn=_combine)
            hs = b_cum + a_cum * h0[:, :, None]  # h_t
            ah = hs - bu  # a_t·h_{t-1}

            dout = tl.load(dout_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
            if HAS_Z:
                zt = tl.load(z_ptr + idx, mask=mask_dl, other=0.0).to(ACC)
                sig = tl.sigmoid(zt)
                y = tl.sum(hs * Ct, axis=1)
                if HAS_D:
                    y += Dv[:, None] * u
                tl.store(dz_ptr + idx, dout * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_dl)
                dy = dout * zt * sig
            else:
                dy = dout

            # adjoint: λ_t = C_t·dy_t + a_{t+1}·λ_{t+1}, scanned from the end of the chunk, then the carried λ
            a_next = tl.where(mask_next[:, None, :], tl.exp(dt_next[:, None, :] * A[:, :, None]), 0.0)
            g = Ct * dy[:, None, :]
            an_cum, lam_loc = tl.associative_scan((a_next, g), axis=2, combine_fn=_combine, reverse=True)
            lam_t = lam_loc + an_cum * lam[:, :, None]
            lam = tl.sum(tl.where(offs_l[None, None, :] == 0, lam_t, 0.0), axis=2)

            ddt = tl.sum(lam_t * (A[:, :, None] * ah + Bt * u[:, None, :]), axis=1)
            du = tl.sum(lam_t * Bt, axis=1) * dt
            if HAS_D:
                du += Dv[:, None] * dy
                dD_acc += tl.sum(tl.where(mask_dl, dy * u, 0.0), axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_raw)
            ddt = tl.where(mask_dl, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=1)
            tl.store(du_ptr + idx, du, mask=mask_dl)
            tl.store(ddelta_ptr + idx, ddt, mask=mask_dl)

            dA_acc += tl.sum(lam_t * ah * dt[:, None, :], axis=2)
            db = lam_t * (dt * u)[:, None, :]  # ∂/∂B_t per channel
            dc = hs * dy[:, None, :]  # ∂/∂C_t per channel
            # variable dB / dC sum over the channels of a group: per-program partial sums (reduced afterwards), or
            # atomic adds when the partial buffer would be too large (atomics contend: every program of a group
            # adds to the same addresses)
            part_idx = ((pid_b * tl.num_programs(1) + pid_d) * n_state + offs_n) * length
            if B_VAR:
                if BC_PARTIAL:
                    tl.store(dbvar_ptr + part_idx[:, None] + t[None, :], tl.sum(db, axis=0), mask=mask_nl)
                else:
                    tl.atomic_add(dbvar_ptr + bc_row[:, None] + t[None, :], tl.sum(db, axis=0), mask=mask_nl)
            else:
                dB_acc += tl.sum(db, axis=2)
            if C_VAR:
                if BC_PARTIAL:
                    tl.store(dcvar_ptr + part_idx[:, None] + t[None, :], tl.sum(dc, axis=0), mask=mask_nl)
                else:
                    tl.atomic_add(dcvar_ptr + bc_row[:, None] + t[None, :], tl.sum(dc, axis=0), mask=mask_nl)
            else:
                dC_acc += tl.sum(dc, axis=2)

        sums_row = sums_ptr + pid_b * (3 * n_state + 2) * dim
        nd_idx = offs_n[None, :] * dim + offs_d[:, None]  # (BLOCK_D, BLOCK_N) → row n, column d
        tl.store(sums_row + nd_idx, dA_acc, mask=mask_dn)
        if not B_VAR:
            tl.store(sums_row + n_state * dim + nd_idx, dB_acc, mask=mask_dn)
        if not C_VAR:
            tl.store(sums_row + 2 * n_state * dim + nd_idx, dC_acc, mask=mask_dn)
        if HAS_D:
            tl.store(sums_row + 3 * n_state * dim + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(sums_row + (3 * n_state + 1) * dim + offs_d, dbias_acc, mask=mask_d)


def _check_triton(u: Tensor) -> None:
    if triton is None:
        raise RuntimeError("the triton backend needs the `triton` package (it ships with CUDA builds of PyTorch)")
    if u.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {u.device.type}"
        )


class _TritonScanKernel:
    """:class:`~visionkit.ops._scan_inputs.ScanKernel` running the Triton kernels above.

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
        u, _, A, B, C, D, z, delta_bias, delta_softplus = inputs
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
            "HAS_D": D is not None,
            "HAS_Z": z is not None,
            "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": delta_softplus,
            "B_VAR": B.dim() == 4,
            "C_VAR": C.dim() == 4,
            "ACC": tl.float64 if compute_dtype(u) == torch.float64 else tl.float32,
            "BLOCK_D": block_d,
            "BLOCK_N": _next_power_of_2(n),
            "BLOCK_L": tiles.block_l,
            "num_warps": warps,
        }
        return (dim, length, n, groups, n_chunks), meta, (batch, -(-dim // block_d))

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Fused forward; see :class:`~visionkit.ops._scan_inputs.ScanKernel`."""
        u, delta, A, B, C, D, z, delta_bias, _ = inputs
        _check_triton(u)
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
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, out, states, last, *sizes, **meta,
        )  # fmt: skip
        return out, last, (states,)

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Fused backward; see :class:`~visionkit.ops._scan_inputs.ScanKernel`."""
        u, delta, A, B, C, D, z, delta_bias, _ = inputs
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
            _scan_bwd_kernel[grid](
                u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
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


def selective_scan_triton(
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
    """Selective scan with fused Triton kernels (the ``"triton"`` backend of :func:`visionkit.ops.selective_scan`).

    Args:
        u: Input sequence, (batch, dim, L), CUDA (or CPU under ``TRITON_INTERPRET=1``).
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real.
        B: Input matrix, (dim, N), (batch, N, L) or (batch, G, N, L) with dim % G == 0.
        C: Output matrix, same shape options as ``B`` (grouped B and C must have the same G).
        D: Optional skip weight, (dim,).
        z: Optional gate, (batch, dim, L).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L, (batch, dim, N).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.
    """
    _check_triton(u)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    kernel = _TRAINING_KERNEL if training else _INFERENCE_KERNEL
    return run_scan_kernel(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
