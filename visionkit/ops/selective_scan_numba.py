"""The ``"numba"`` selective-scan backend: compiled CPU kernels for the forward and a hand-written backward.

Forward: one task per (batch, channel), spread over the cores with ``numba.prange``; each task walks L in chunks of
:data:`CHUNK` steps. Per chunk, the pointwise work (softplus, exp(Δ·A), the gate) runs as separate loops that LLVM
vectorises, and only the recurrence h_t = a_t·h_{t-1} + Δ_t·B_t·u_t is sequential. The state at the start of every
chunk is saved, (batch, dim, ⌈L/CHUNK⌉, N) in all, instead of an O(batch·dim·L·N) activation.

Backward (``shared/reference/mamba.md`` §3): per task, the chunks are visited last to first; each chunk's states are
recomputed from its saved start state, then the adjoint λ_t = C_t·dy_t + a_{t+1}·λ_{t+1} runs in reverse. A task owns
a block of channels of one batch element that lies inside a single group of every variable B / C, so it alone writes
its slot of the partial dB / dC / dA / dD / ddelta_bias buffers; the slots are summed afterwards (no data races).

exp and log1p are written out for float32 (range reduction plus polynomial) because numba's calls into libm are not
vectorised; float64 (used by gradcheck) calls ``math.exp`` / ``math.log1p``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from visionkit.ops._scan_inputs import Grads, ScanInputs, compute_dtype, run_scan_kernel

try:
    import numba
    from numba import types
    from numba.extending import overload

    _NUMBA_ERROR: str | None = None
except Exception as exc:  # missing or broken numba: importing this module must still work
    numba = None
    _NUMBA_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["CHUNK", "selective_scan_numba"]

#: Steps per chunk: one saved state per chunk; the backward keeps (CHUNK + 1)·N recomputed states per task.
CHUNK = 64

# fastmath without nnan / ninf, so that NaN and Inf still propagate like in the reference
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# float32 exp: Cody-Waite split of ln 2 and the degree-5 minimax polynomial of Cephes' expf (cephes/single/expf.c)
_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_EXP_P = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1))
_EXP_P5 = _F(5.0000001201e-1)
_HALF, _ONE, _TWO = _F(0.5), _F(1.0), _F(2.0)
_EXP_LO = _F(-87.33654)  # ln(FLT_MIN): below it the result is ~1e-38 instead of a denormal
_EXP_HI = _F(88.72283)  # ln(FLT_MAX): above it the result is +inf
_INF = _F(np.inf)
# log1p(e) = 2·atanh(s), s = e / (2 + e) ∈ [0, 1/3] for e ∈ [0, 1]: odd series 2·Σ s^(2k+1) / (2k+1), 8 terms
# (truncation (1/9)^8 / 17 < 2e-9 relative)
_LOG1P_Q = tuple(_F(1.0 / (2 * k + 1)) for k in range(8))
# torch.nn.functional.softplus: beta 1, threshold 20 (x > 20 returns x)
_SOFTPLUS_THRESHOLD = 20.0


def _exp_f32(x: float) -> float:
    """exp(x) in float32 with only arithmetic and a bit cast, so loops calling it vectorise (max rel. error ~2e-7)."""
    xc = x if x > _EXP_LO else _EXP_LO
    xc = xc if xc < _EXP_HI else _EXP_HI
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI - k * _LN2_LO
    p0, p1, p2, p3, p4 = _EXP_P
    p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + _EXP_P5
    y = p * (r * r) + r + _ONE
    scale = np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)
    y = y * scale
    y = _INF if x > _EXP_HI else y
    return x if x != x else y  # NaN in, NaN out


def _log1p_unit_f32(e: float) -> float:
    """log1p(e) for e in [0, 1] in float32, arithmetic only (relative error ~1e-7, exact near 0)."""
    s = e / (_TWO + e)
    s2 = s * s
    q0, q1, q2, q3, q4, q5, q6, q7 = _LOG1P_Q
    p = ((((((q7 * s2 + q6) * s2 + q5) * s2 + q4) * s2 + q3) * s2 + q2) * s2 + q1) * s2 + q0
    return _TWO * s * p


def _exp(x: float) -> float:
    """exp(x): vectorisable polynomial for float32, ``math.exp`` for float64 (numba overload below)."""
    return math.exp(x)


def _log1p_unit(e: float) -> float:
    """log1p(e) for e in [0, 1]: vectorisable series for float32, ``math.log1p`` for float64."""
    return math.log1p(e)


if numba is not None:
    # numba's overload protocol needs the typing function and its implementation to have identical signatures,
    # so neither is annotated; LLVM inlines the float32 versions into the kernels and vectorises them
    _exp_f32_jit = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)(_exp_f32)
    _log1p_unit_f32_jit = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True)(_log1p_unit_f32)

    @overload(_exp)
    def _exp_overload(x):
        if x == types.float32:
            return lambda x: _exp_f32_jit(x)
        return lambda x: math.exp(x)

    @overload(_log1p_unit)
    def _log1p_overload(e):
        if e == types.float32:
            return lambda e: _log1p_unit_f32_jit(e)
        return lambda e: math.log1p(e)

    def _jit(parallel: bool = False) -> Callable[[Callable], Callable]:
        return numba.njit(parallel=parallel, cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True)

    prange = numba.prange
else:  # keep the module importable; the kernels are never called without numba

    def _jit(parallel: bool = False) -> Callable[[Callable], Callable]:
        return lambda fn: fn

    prange = range


@_jit()
def _softplus(x: float, one: float, threshold: float) -> float:
    """Softplus as torch computes it (beta 1): x above ``threshold``, else max(x, 0) + log1p(exp(-|x|))."""
    zero = one - one
    sp = (x if x > zero else zero) + _log1p_unit(_exp(-abs(x)))
    return x if x > threshold else sp


@_jit()
def _sigmoid(x: float, one: float) -> float:
    """1 / (1 + exp(-x)), from exp(-|x|) so it never overflows."""
    e = _exp(-abs(x))
    r = one / (one + e)
    return r if x >= one - one else e * r


@_jit()
def _prepare_chunk(
    ins: tuple[np.ndarray, ...],
    b: int,
    d: int,
    t0: int,
    n_steps: int,
    softplus: bool,
    has_z: bool,
    out: tuple[np.ndarray, ...],
) -> None:
    """Pointwise part of one chunk of (b, d): Δ_t, dΔ_t/d delta_t, a_t = exp(Δ_t·A), silu(z_t) and silu'(z_t).

    ``out`` = (dt, dsp, gate, dgate) of shape (chunk,) and a of shape (chunk, N).
    """
    u, delta, A, _, _, _, z, bias = ins
    dt, dsp, gate, dgate, a = out
    one = u.dtype.type(1.0)
    threshold = u.dtype.type(_SOFTPLUS_THRESHOLD)
    n_state = A.shape[1]
    bd = bias[d]
    if softplus:
        for i in range(n_steps):
            x = delta[b, d, t0 + i] + bd
            dt[i] = _softplus(x, one, threshold)
            dsp[i] = _sigmoid(x, one) if x <= threshold else one
    else:
        for i in range(n_steps):
            dt[i] = delta[b, d, t0 + i] + bd
            dsp[i] = one
    if n_state == 1:  # vectorise over time instead of over a length-1 state loop
        a0 = A[d, 0]
        for i in range(n_steps):
            a[i, 0] = _exp(dt[i] * a0)
    else:
        for i in range(n_steps):
            for n in range(n_state):
                a[i, n] = _exp(dt[i] * A[d, n])
    if has_z:
        for i in range(n_steps):
            zz = z[b, d, t0 + i]
            sig = _sigmoid(zz, one)
            gate[i] = zz * sig
            dgate[i] = sig * (one + zz * (one - sig))  # silu'(z) (mamba.md §3)


@_jit(parallel=True)
def _forward_kernel(
    ins: tuple[np.ndarray, ...],
    softplus: bool,
    has_z: bool,
    chunk: int,
    out: np.ndarray,
    states: np.ndarray,
    last: np.ndarray,
) -> None:
    """Forward scan; writes ``out`` (batch, dim, L), ``states`` (batch, dim, n_chunks, N) and ``last`` (batch, dim, N).

    ``ins`` = (u, delta, A, B, C, D, z, delta_bias) in one float dtype; B / C arrive as (batch or 1, groups, L or 1,
    N) with a size-1 batch or time axis broadcast, so time-invariant B / C are (1, dim, 1, N) (one group per channel).
    """
    u, _, A, Bm, Cm, D, _, _ = ins
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = states.shape[2]
    zero = u.dtype.type(0.0)
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    for job in prange(batch * dim):
        b, d = job // dim, job % dim
        bb, gb, sb = b if Bm.shape[0] > 1 else 0, d // cpg_b, 1 if Bm.shape[2] > 1 else 0
        bc, gc, sc = b if Cm.shape[0] > 1 else 0, d // cpg_c, 1 if Cm.shape[2] > 1 else 0
        h = np.zeros(n_state, dtype=u.dtype)
        a = np.empty((chunk, n_state), dtype=u.dtype)
        dt = np.empty(chunk, dtype=u.dtype)
        dsp, gate, dgate, y = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        dd = D[d]
        for c in range(n_chunks):
            t0 = c * chunk
            n_steps = min(chunk, length - t0)
            states[b, d, c, :] = h
            _prepare_chunk(ins, b, d, t0, n_steps, softplus, has_z, (dt, dsp, gate, dgate, a))
            if n_state == 1:
                h0 = h[0]
                for i in range(n_steps):
                    h0 = a[i, 0] * h0 + dt[i] * u[b, d, t0 + i] * Bm[bb, gb, (t0 + i) * sb, 0]
                    y[i] = h0 * Cm[bc, gc, (t0 + i) * sc, 0]
                h[0] = h0
            else:
                for i in range(n_steps):
                    t = t0 + i
                    du = dt[i] * u[b, d, t]
                    acc = zero
                    for n in range(n_state):
                        h[n] = a[i, n] * h[n] + du * Bm[bb, gb, t * sb, n]
                        acc += h[n] * Cm[bc, gc, t * sc, n]
                    y[i] = acc
            for i in range(n_steps):
                y[i] += dd * u[b, d, t0 + i]
            if has_z:
                for i in range(n_steps):
                    y[i] *= gate[i]
            out[b, d, t0 : t0 + n_steps] = y[:n_steps]
        last[b, d, :] = h


@_jit(parallel=True)
def _backward_kernel(
    ins: tuple[np.ndarray, ...],
    softplus: bool,
    has_z: bool,
    chunk: int,
    states: np.ndarray,
    dout: np.ndarray,
    blocking: tuple[int, int, int],
    grads: tuple[np.ndarray, ...],
) -> None:
    """Backward scan, one task per (batch element, block of ``block`` channels).

    ``ins`` as in :func:`_forward_kernel`; ``blocking`` = (block, slot_div_b, slot_div_c). Writes ``grads`` = (du,
    ddelta, dz) (batch, dim, L) and partial sums that the caller reduces: dA_part (batch, dim, N), dB_part / dC_part
    (batch, slots, L or 1, N) with slot d // slot_div (slot_div = block for a variable B / C: one slot per block; 1 for
    a time-invariant one), dD_part / dbias_part (batch, dim).
    """
    u, _, A, Bm, Cm, D, _, _ = ins
    block, slot_div_b, slot_div_c = blocking
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part = grads
    batch, dim, length = u.shape
    n_state = A.shape[1]
    n_chunks = states.shape[2]
    zero = u.dtype.type(0.0)
    cpg_b, cpg_c = dim // Bm.shape[1], dim // Cm.shape[1]
    n_blocks = dim // block
    for job in prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        hs = np.empty((chunk + 1, n_state), dtype=u.dtype)  # hs[i] = h_{t0+i-1}
        a = np.empty((chunk, n_state), dtype=u.dtype)
        lam = np.empty(n_state, dtype=u.dtype)  # a_{t+1}·λ_{t+1}, carried backwards across chunks
        dA_acc = np.empty(n_state, dtype=u.dtype)
        dt = np.empty(chunk, dtype=u.dtype)
        dsp, gate, dgate, dy = np.empty_like(dt), np.empty_like(dt), np.empty_like(dt), np.empty_like(dt)
        for d in range(k * block, (k + 1) * block):
            bb, gb, sb = b if Bm.shape[0] > 1 else 0, d // cpg_b, 1 if Bm.shape[2] > 1 else 0
            bc, gc, sc = b if Cm.shape[0] > 1 else 0, d // cpg_c, 1 if Cm.shape[2] > 1 else 0
            slot_b, slot_c = d // slot_div_b, d // slot_div_c
            dd = D[d]
            lam[:] = zero
            dA_acc[:] = zero
            dD_acc = zero
            dbias_acc = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                n_steps = min(chunk, length - t0)
                _prepare_chunk(ins, b, d, t0, n_steps, softplus, has_z, (dt, dsp, gate, dgate, a))
                hs[0, :] = states[b, d, c, :]
                for i in range(n_steps):
                    t = t0 + i
                    du_t = dt[i] * u[b, d, t]
                    for n in range(n_state):
                        hs[i + 1, n] = a[i, n] * hs[i, n] + du_t * Bm[bb, gb, t * sb, n]
                if has_z:  # out = (y + D·u)·silu(z): dz needs y_t = Σ_n C_t·h_t
                    for i in range(n_steps):
                        t = t0 + i
                        acc = zero
                        for n in range(n_state):
                            acc += Cm[bc, gc, t * sc, n] * hs[i + 1, n]
                        g = dout[b, d, t]
                        dz[b, d, t] = g * (acc + dd * u[b, d, t]) * dgate[i]
                        dy[i] = g * gate[i]
                else:
                    dy[:n_steps] = dout[b, d, t0 : t0 + n_steps]
                for i in range(n_steps - 1, -1, -1):
                    t = t0 + i
                    uu, dy_t, dt_t = u[b, d, t], dy[i], dt[i]
                    du_acc = dy_t * dd
                    ddt_acc = zero
                    for n in range(n_state):
                        b_n = Bm[bb, gb, t * sb, n]
                        lam_n = Cm[bc, gc, t * sc, n] * dy_t + lam[n]
                        dC_part[b, slot_c, t * sc, n] += dy_t * hs[i + 1, n]
                        dB_part[b, slot_b, t * sb, n] += lam_n * dt_t * uu
                        du_acc += lam_n * dt_t * b_n
                        da = lam_n * hs[i, n] * a[i, n]  # ∂loss/∂a_t · a_t
                        ddt_acc += da * A[d, n] + lam_n * b_n * uu
                        dA_acc[n] += da * dt_t
                        lam[n] = a[i, n] * lam_n
                    du[b, d, t] = du_acc
                    dD_acc += dy_t * uu
                    ddelta[b, d, t] = ddt_acc * dsp[i]
                    dbias_acc += ddt_acc * dsp[i]
            dA_part[b, d, :] = dA_acc
            dD_part[b, d] = dD_acc
            dbias_part[b, d] = dbias_acc


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
        chunk = CHUNK
        out = torch.empty((batch, dim, length), dtype=dtype)
        states = torch.empty((batch, dim, -(-length // chunk), n), dtype=dtype)
        last = torch.empty((batch, dim, n), dtype=dtype)
        arrays = _arrays(u, delta, A, B, C, D, z, delta_bias, dtype)
        _forward_kernel(arrays, bool(delta_softplus), z is not None, chunk, out.numpy(), states.numpy(), last.numpy())
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
        _backward_kernel(arrays, *flags, states.detach().numpy(), dout_np, (block, div_b, div_c), grads)

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
